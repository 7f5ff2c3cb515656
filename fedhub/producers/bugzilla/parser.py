"""
Parse Bugzilla notification mail ("bugmail") into immutable L{BugEvent} values.

The entry point is L{parse_bugmail}.  It accepts the raw bytes of one mail as
it arrives over SMTP (CRLF or LF line endings) and either returns a
L{BugEvent} or raises a L{BugmailError}:

  - L{NotBugmail} when the mail is not a Bugzilla bug event at all (no
    C{X-Bugzilla-*} headers, Launchpad bug mail, Bugzilla flag requests,
    whines and account mail);
  - L{MalformedBugmail} when it is Bugzilla mail that can not be understood,
    or that exceeds one of the resource limits below.

Every header and every byte of the body is treated as hostile input.  The
parser never evaluates anything, bounds every size it works with and is
linear in the size of its input: it does not hand the mail to the feed parser
of Python's C{email} package, whose cost grows with lines times MIME depth
(and quadratically with long parameter lists), but splits the few MIME layers
bugmail uses itself, under hard caps.  Decoding (quoted-printable, base64,
RFC 2047 words, charsets from an allow-list) uses the standard library.

The layout knowledge (column offsets of the change table, comment markers,
footers) follows Bugzilla's own templates; see C{docs/bugmail.md}.
"""

from __future__ import annotations

import binascii
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, Mapping, Sequence, cast

from fedhub.errors import FedhubError

__all__ = [
    "Attachment",
    "Blocker",
    "BugEvent",
    "BugmailError",
    "Change",
    "Comment",
    "EventType",
    "MalformedBugmail",
    "NotBugmail",
    "parse_bugmail",
]


# --- limits -------------------------------------------------------------

#: Largest mail accepted, in bytes.  Bugzilla limits a comment to 65,535
#: characters; real bugmail is a few kilobytes.
MAX_MAIL_BYTES = 4 * 1024 * 1024
#: Largest header block (of the mail or of one MIME part), in bytes.
MAX_HEADER_BLOCK_BYTES = 256 * 1024
#: Most physical lines in one header block.
MAX_HEADER_LINES = 2000
#: Longest raw value of a header the parser interprets, in bytes.
MAX_HEADER_VALUE_BYTES = 8192
#: Most distinct C{X-Bugzilla-*} headers in one mail.
MAX_BUGZILLA_HEADERS = 64
#: Deepest MIME nesting followed (the mail itself is depth 0).
MAX_MIME_DEPTH = 5
#: Most MIME parts in one mail, all levels together.
MAX_MIME_PARTS = 64
#: Most parameters of one C{Content-Type} header.
MAX_CONTENT_TYPE_PARAMS = 32
#: Largest bug or attachment id accepted (Bugzilla stores them as signed 32-bit).
MAX_ID = 2**31 - 1
#: Longest login accepted in C{X-Bugzilla-Who}.
MAX_LOGIN_CHARS = 254


# --- errors -------------------------------------------------------------


class BugmailError(FedhubError):
    """
    A mail could not be turned into a L{BugEvent}.

    @ivar reason: A short human-readable explanation, safe to log (it never
        quotes more than a bounded, sanitised excerpt of the mail).
    @ivar code: A stable machine-readable token for counters and metrics,
        e.g. C{"not_bugzilla"}, C{"launchpad"}, C{"too_large"}.
    """

    def __init__(self, reason: str, code: str = "error") -> None:
        self.reason = reason
        self.code = code
        super().__init__(reason)


class NotBugmail(BugmailError):
    """
    The mail is not a Bugzilla bug event: no C{X-Bugzilla-*} headers (for
    example Launchpad bug mail, whose subject also reads C{[Bug N]}), or a
    Bugzilla mail of another kind (flag request, whine, account mail).
    """

    def __init__(self, reason: str, code: str = "not_bugmail") -> None:
        super().__init__(reason, code)


class MalformedBugmail(BugmailError):
    """
    The mail carries C{X-Bugzilla-*} headers but can not be understood, or it
    exceeds one of the parser's resource limits.
    """

    def __init__(self, reason: str, code: str = "malformed") -> None:
        super().__init__(reason, code)


# --- values -------------------------------------------------------------

EventType = Literal["new", "changed", "dep_changed", "comment", "attachment"]

# Bugzilla's field labels (field_descs and the legacy 2.x labels) mapped to
# the field names used by its API and by X-Bugzilla-Changed-Fields.
_FIELD_NAMES: Mapping[str, str] = MappingProxyType(
    {
        "Bug ID": "bug_id",
        "Summary": "short_desc",
        "Product": "product",
        "Component": "component",
        "Version": "version",
        "Hardware": "rep_platform",
        "Platform": "rep_platform",
        "OS": "op_sys",
        "OS/Version": "op_sys",
        "Status": "bug_status",
        "Resolution": "resolution",
        "Severity": "bug_severity",
        "Priority": "priority",
        "Assignee": "assigned_to",
        "AssignedTo": "assigned_to",
        "Reporter": "reporter",
        "ReportedBy": "reporter",
        "QA Contact": "qa_contact",
        "QAContact": "qa_contact",
        "CC": "cc",
        "Keywords": "keywords",
        "Whiteboard": "status_whiteboard",
        "URL": "bug_file_loc",
        "Depends on": "dependson",
        "Blocks": "blocked",
        "See Also": "see_also",
        "Target Milestone": "target_milestone",
        "Flags": "flagtypes.name",
        "Alias": "alias",
        "Group": "bug_group",
        "Deadline": "deadline",
        "Orig. Est.": "estimated_time",
        "Hours Left": "remaining_time",
        "Hours Worked": "work_time",
        "Attachment is obsolete": "attachments.isobsolete",
        "Attachment is patch": "attachments.ispatch",
        "Attachment description": "attachments.description",
        "Attachment filename": "attachments.filename",
        "Attachment mime type": "attachments.mimetype",
        "Attachment is private": "attachments.isprivate",
    }
)

_ATTACHMENT_LABEL = re.compile(r"Attachment #([0-9]{1,10}) (.+)")
_NUMBERED_LABEL = re.compile(r"(?:Attachment|Comment) #[0-9]{1,10}(?: (.*))?")
# What may follow "Attachment #N " / "Comment #N " in a complete label.
_COMPLETE_SUFFIXES = frozenset(
    [label for label in _FIELD_NAMES if label.startswith("Attachment ")]
    + [label[len("Attachment ") :] for label in _FIELD_NAMES if label.startswith("Attachment ")]
    + ["Flags", "Attachment Flags", "is private", "Tags"]
)


# --- reading values back from JSON ----------------------------------------


def _json_object(data: object, where: str, keys: frozenset[str]) -> Mapping[str, Any]:
    """
    C{data} when it is a JSON object with exactly C{keys}, else a ValueError
    naming C{where}.
    """
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a JSON object, not {type(data).__name__}")
    if data.keys() != keys:
        missing = sorted(keys - data.keys())
        extra = sorted(str(k) for k in data.keys() - keys)
        parts = []
        if missing:
            parts.append("missing " + ", ".join(missing))
        if extra:
            parts.append("unknown " + ", ".join(_excerpt(k, 40) for k in extra[:5]))
        raise ValueError(f"{where}: {'; '.join(parts)}")
    return data


def _json_str(data: Mapping[str, Any], key: str, where: str, *, nullable: bool = False) -> Any:
    value = data[key]
    if type(value) is str or (nullable and value is None):
        return value
    expected = "a string or null" if nullable else "a string"
    raise ValueError(f"{where}.{key} must be {expected}, not {type(value).__name__}")


def _json_int(data: Mapping[str, Any], key: str, where: str, *, nullable: bool = False) -> Any:
    # bool is an int to Python but not to JSON: true is no bug id.
    value = data[key]
    if type(value) is int or (nullable and value is None):
        return value
    expected = "an integer or null" if nullable else "an integer"
    raise ValueError(f"{where}.{key} must be {expected}, not {type(value).__name__}")


def _json_strings(data: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = data[key]
    if type(value) is not list or any(type(item) is not str for item in value):
        raise ValueError(f"{where}.{key} must be a list of strings")
    return tuple(value)


def _json_list(data: Mapping[str, Any], key: str, where: str) -> list[Any]:
    value = data[key]
    if type(value) is not list:
        raise ValueError(f"{where}.{key} must be a list, not {type(value).__name__}")
    return value


@dataclass(frozen=True)
class Change:
    """
    One row of Bugzilla's change table: a field and its old and new value.

    For a new bug, every row of the new-bug table becomes a change with an
    empty C{removed} value (Bugzilla itself lists all of them in
    C{X-Bugzilla-Changed-Fields}).

    @ivar field: The label Bugzilla printed (C{"Status"}, C{"QA Contact"},
        a custom field's description, C{"Attachment #12 Flags"}).
    @ivar removed: The old value, re-joined across wrapped lines; C{""} if none.
    @ivar added: The new value, re-joined across wrapped lines; C{""} if none.
    """

    field: str
    removed: str
    added: str

    @property
    def name(self) -> str | None:
        """
        The Bugzilla field name for a stock field label (C{"bug_status"} for
        C{"Status"}; C{"attachments.<x>"} for per-attachment labels), or
        C{None} for custom and unknown fields.
        """
        found = _FIELD_NAMES.get(self.field)
        if found is not None:
            return found
        m = _ATTACHMENT_LABEL.fullmatch(self.field)
        if m is not None:
            rest = m.group(2)
            if rest.startswith("Attachment "):
                rest = rest[len("Attachment ") :]
            if rest == "Flags":
                return "flagtypes.name"
            return _FIELD_NAMES.get("Attachment " + rest)
        return None

    @property
    def attachment_id(self) -> int | None:
        """
        The attachment a per-attachment row (C{"Attachment #12 Flags"}) is
        about, or C{None} for a row about the bug.
        """
        m = _ATTACHMENT_LABEL.fullmatch(self.field)
        return int(m.group(1)) if m is not None else None

    def to_json(self) -> dict[str, Any]:
        """
        Return a JSON-serialisable dict: C{field}, C{name}, C{removed}, C{added}.
        """
        return {"field": self.field, "name": self.name, "removed": self.removed, "added": self.added}

    @classmethod
    def from_json(cls, data: object, where: str = "change") -> Change:
        """
        The change L{to_json} described.

        @raise ValueError: C{data} is not what L{to_json} returns (its
            C{name} included, which must be the one of C{field}).
        """
        data = _json_object(data, where, _CHANGE_KEYS)
        change = cls(
            _json_str(data, "field", where),
            _json_str(data, "removed", where),
            _json_str(data, "added", where),
        )
        if _json_str(data, "name", where, nullable=True) != change.name:
            raise ValueError(f"{where}.name does not match its field")
        return change


@dataclass(frozen=True)
class Comment:
    """
    A comment carried by the mail.

    @ivar number: The comment number (C{0} for a new bug's description), or
        C{None} for Bugzilla 2.x "Additional Comments" markers, which had none.
    @ivar author: The author's login when the mail names one, otherwise the
        identity text Bugzilla printed.
    @ivar text: The comment text, without Bugzilla's attachment notice and
        without mail footers.  Quoted text (including quoted older bugmail)
        is kept as it is and never interpreted.
    @ivar author_name: The author's real name, when the mail shows one.
    """

    number: int | None
    author: str
    text: str
    author_name: str | None = None

    def to_json(self) -> dict[str, Any]:
        """
        Return a JSON-serialisable dict: C{number}, C{author}, C{author_name}, C{text}.
        """
        return {
            "number": self.number,
            "author": self.author,
            "author_name": self.author_name,
            "text": self.text,
        }

    @classmethod
    def from_json(cls, data: object, where: str = "comment") -> Comment:
        """
        The comment L{to_json} described.

        @raise ValueError: C{data} is not what L{to_json} returns.
        """
        data = _json_object(data, where, _COMMENT_KEYS)
        return cls(
            _json_int(data, "number", where, nullable=True),
            _json_str(data, "author", where),
            _json_str(data, "text", where),
            _json_str(data, "author_name", where, nullable=True),
        )


@dataclass(frozen=True)
class Attachment:
    """
    An attachment announced as created by the mail ("Created attachment N").

    @ivar id: The attachment id.
    @ivar description: Its description as printed below the notice.
    """

    id: int
    description: str

    def to_json(self) -> dict[str, Any]:
        """
        Return a JSON-serialisable dict: C{id}, C{description}.
        """
        return {"id": self.id, "description": self.description}

    @classmethod
    def from_json(cls, data: object, where: str = "attachment") -> Attachment:
        """
        The attachment L{to_json} described.

        @raise ValueError: C{data} is not what L{to_json} returns.
        """
        data = _json_object(data, where, _ATTACHMENT_KEYS)
        return cls(_json_int(data, "id", where), _json_str(data, "description", where))


@dataclass(frozen=True)
class Blocker:
    """
    For a C{dep_changed} event: the bug this bug depends on, whose state changed.

    @ivar bug_id: The id of the bug that changed.
    @ivar summary: Its summary, as printed in the mail (may be C{""}).
    """

    bug_id: int
    summary: str

    def to_json(self) -> dict[str, Any]:
        """
        Return a JSON-serialisable dict: C{bug_id}, C{summary}.
        """
        return {"bug_id": self.bug_id, "summary": self.summary}

    @classmethod
    def from_json(cls, data: object, where: str = "blocker") -> Blocker:
        """
        The blocker L{to_json} described.

        @raise ValueError: C{data} is not what L{to_json} returns.
        """
        data = _json_object(data, where, _BLOCKER_KEYS)
        return cls(_json_int(data, "bug_id", where), _json_str(data, "summary", where))


def _empty_headers() -> Mapping[str, str]:
    return MappingProxyType({})


@dataclass(frozen=True)
class BugEvent:
    """
    One Bugzilla bug event, as described by one notification mail.

    Values taken from C{X-Bugzilla-*} headers are the bug's state I{after} the
    event; C{None} means the mail did not carry the header (older Bugzilla
    versions, forks), C{""} that it carried it empty (for example an open
    bug's resolution).

    @ivar bug_id: The bug id.
    @ivar summary: The bug summary (from the decoded Subject).
    @ivar product: C{X-Bugzilla-Product}.
    @ivar component: C{X-Bugzilla-Component}.
    @ivar who: Login of the person whose action caused the mail
        (C{X-Bugzilla-Who}; for Bugzilla 2.x mail taken from the body).
    @ivar event_type: C{"new"} (bug filed), C{"changed"} (fields changed,
        possibly with comments), C{"dep_changed"} (a bug this one depends on
        changed state), C{"comment"} (only comments), C{"attachment"} (an
        attachment was created, possibly with its own flag rows and comment).
    @ivar url: The bug's C{show_bug.cgi} link from the body.
    @ivar who_name: The changer's real name when the mail shows it.
    @ivar source: The installation's base URL (C{X-Bugzilla-URL}, or for
        older mail the part of C{url} before C{show_bug.cgi}).
    @ivar classification: C{X-Bugzilla-Classification}.
    @ivar version: C{X-Bugzilla-Version}.
    @ivar status: C{X-Bugzilla-Status}.
    @ivar resolution: C{X-Bugzilla-Resolution}.
    @ivar priority: C{X-Bugzilla-Priority}.
    @ivar severity: C{X-Bugzilla-Severity}.
    @ivar assignee: C{X-Bugzilla-Assigned-To}.
    @ivar target_milestone: C{X-Bugzilla-Target-Milestone}.
    @ivar keywords: C{X-Bugzilla-Keywords}, split.
    @ivar flags: C{X-Bugzilla-Flags}, split (bug flags after the event, e.g.
        C{"needinfo?"}; no requestees).
    @ivar changed_fields: Field names from C{X-Bugzilla-Changed-Field-Names}
        (bugzilla.mozilla.org) or C{X-Bugzilla-Changed-Fields}, split on white
        space.
    @ivar changes: The rows of the change table(s), or of the new-bug table.
    @ivar comments: Every comment in the mail, in mail order.
    @ivar attachments: Every attachment the mail announces as created.
    @ivar blocker: For C{dep_changed}: the bug whose change caused the mail.
    @ivar message_id: The C{Message-ID} header.
    @ivar date: The C{Date} header (the time of the change; the same in every
        copy Bugzilla sends for one event).
    @ivar reasons: C{X-Bugzilla-Reason}, split; empty for C{None}.
    @ivar watch_reason: C{X-Bugzilla-Watch-Reason}, or C{None} when absent or
        C{None}.
    @ivar headers: Every C{X-Bugzilla-*} header of the mail, decoded and with
        control characters removed, under its canonical name.
    """

    bug_id: int
    summary: str
    product: str
    component: str
    who: str
    event_type: EventType
    url: str
    who_name: str | None = None
    source: str | None = None
    classification: str | None = None
    version: str | None = None
    status: str | None = None
    resolution: str | None = None
    priority: str | None = None
    severity: str | None = None
    assignee: str | None = None
    target_milestone: str | None = None
    keywords: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()
    changed_fields: tuple[str, ...] = ()
    changes: tuple[Change, ...] = ()
    comments: tuple[Comment, ...] = ()
    attachments: tuple[Attachment, ...] = ()
    blocker: Blocker | None = None
    message_id: str | None = None
    date: str | None = None
    reasons: tuple[str, ...] = ()
    watch_reason: str | None = None
    headers: Mapping[str, str] = field(default_factory=_empty_headers, hash=False)

    @property
    def comment(self) -> Comment | None:
        """
        The first comment of the mail (a new bug's description, or the comment
        that came with a change), or C{None}.  All of them are in C{comments}.
        """
        return self.comments[0] if self.comments else None

    @property
    def attachment(self) -> Attachment | None:
        """
        The first attachment the mail announces as created, or C{None}.
        """
        return self.attachments[0] if self.attachments else None

    def summary_line(self) -> str:
        """
        Return one line of human text describing the event, e.g.
        C{"jdoe@example.com updated status, resolution on bug 218297 'Kernel
        Panic and crash'"}.
        """
        bug = f"bug {self.bug_id} '{self.summary}'"
        if self.event_type == "new":
            return f"{self.who} filed {bug}"
        if self.event_type == "comment":
            return f"{self.who} commented on {bug}"
        if self.event_type == "attachment" and self.attachments:
            return f"{self.who} added attachment {self.attachments[0].id} to {bug}"
        if self.event_type == "dep_changed":
            if self.blocker is not None:
                return (
                    f"{self.who} changed the state of bug {self.blocker.bug_id},"
                    f" which {bug} depends on"
                )
            return f"{self.who} changed a bug that {bug} depends on"
        labels: list[str] = []
        for change in self.changes:
            label = change.field.lower()
            if label not in labels:
                labels.append(label)
        if not labels:
            labels = list(dict.fromkeys(self.changed_fields))
        if labels:
            return f"{self.who} updated {', '.join(labels)} on {bug}"
        return f"{self.who} updated {bug}"

    def to_json(self) -> dict[str, Any]:
        """
        Return the event as a JSON-serialisable dict of plain lists, strings,
        integers and C{None}, for use as a message body.  C{comment} and
        C{attachment} repeat the first entries of C{comments}/C{attachments}.
        """
        first_comment = self.comment
        first_attachment = self.attachment
        return {
            "bug_id": self.bug_id,
            "summary": self.summary,
            "product": self.product,
            "component": self.component,
            "classification": self.classification,
            "version": self.version,
            "status": self.status,
            "resolution": self.resolution,
            "priority": self.priority,
            "severity": self.severity,
            "assignee": self.assignee,
            "target_milestone": self.target_milestone,
            "keywords": list(self.keywords),
            "flags": list(self.flags),
            "who": self.who,
            "who_name": self.who_name,
            "event_type": self.event_type,
            "changed_fields": list(self.changed_fields),
            "changes": [c.to_json() for c in self.changes],
            "comment": first_comment.to_json() if first_comment is not None else None,
            "comments": [c.to_json() for c in self.comments],
            "attachment": first_attachment.to_json() if first_attachment is not None else None,
            "attachments": [a.to_json() for a in self.attachments],
            "blocker": self.blocker.to_json() if self.blocker is not None else None,
            "url": self.url,
            "source": self.source,
            "message_id": self.message_id,
            "date": self.date,
            "reasons": list(self.reasons),
            "watch_reason": self.watch_reason,
            "headers": dict(self.headers),
        }

    @classmethod
    def from_json(cls, data: object) -> BugEvent:
        """
        The event L{to_json} described: C{BugEvent.from_json(e.to_json())}
        equals C{e}, headers included.

        The input is checked as untrusted (it may come from another
        process): exactly the keys L{to_json} writes, with their JSON types,
        C{comment} and C{attachment} equal to the first entries of
        C{comments} and C{attachments}, and each change's C{name} the one
        of its C{field}.

        @raise ValueError: C{data} is not what L{to_json} returns; the
            message names the offending key.
        """
        where = "event"
        data = _json_object(data, where, _EVENT_KEYS)
        event_type = data["event_type"]
        if type(event_type) is not str or event_type not in _EVENT_TYPES:
            raise ValueError(f"{where}.event_type is not one of {', '.join(sorted(_EVENT_TYPES))}")
        changes = tuple(
            Change.from_json(item, f"{where}.changes[{i}]")
            for i, item in enumerate(_json_list(data, "changes", where))
        )
        comments = tuple(
            Comment.from_json(item, f"{where}.comments[{i}]")
            for i, item in enumerate(_json_list(data, "comments", where))
        )
        attachments = tuple(
            Attachment.from_json(item, f"{where}.attachments[{i}]")
            for i, item in enumerate(_json_list(data, "attachments", where))
        )
        first_comment = comments[0].to_json() if comments else None
        if data["comment"] != first_comment or type(data["comment"]) is not type(first_comment):
            raise ValueError(f"{where}.comment is not the first of {where}.comments")
        first_attachment = attachments[0].to_json() if attachments else None
        if data["attachment"] != first_attachment or (
            type(data["attachment"]) is not type(first_attachment)
        ):
            raise ValueError(f"{where}.attachment is not the first of {where}.attachments")
        # Compared as JSON values above: make sure no bool passed for an int.
        if comments:
            Comment.from_json(data["comment"], f"{where}.comment")
        if attachments:
            Attachment.from_json(data["attachment"], f"{where}.attachment")
        blocker = data["blocker"]
        headers = data["headers"]
        if type(headers) is not dict or any(
            type(name) is not str or type(value) is not str for name, value in headers.items()
        ):
            raise ValueError(f"{where}.headers must be an object of strings")
        return cls(
            bug_id=_json_int(data, "bug_id", where),
            summary=_json_str(data, "summary", where),
            product=_json_str(data, "product", where),
            component=_json_str(data, "component", where),
            who=_json_str(data, "who", where),
            event_type=cast(EventType, event_type),
            url=_json_str(data, "url", where),
            who_name=_json_str(data, "who_name", where, nullable=True),
            source=_json_str(data, "source", where, nullable=True),
            classification=_json_str(data, "classification", where, nullable=True),
            version=_json_str(data, "version", where, nullable=True),
            status=_json_str(data, "status", where, nullable=True),
            resolution=_json_str(data, "resolution", where, nullable=True),
            priority=_json_str(data, "priority", where, nullable=True),
            severity=_json_str(data, "severity", where, nullable=True),
            assignee=_json_str(data, "assignee", where, nullable=True),
            target_milestone=_json_str(data, "target_milestone", where, nullable=True),
            keywords=_json_strings(data, "keywords", where),
            flags=_json_strings(data, "flags", where),
            changed_fields=_json_strings(data, "changed_fields", where),
            changes=changes,
            comments=comments,
            attachments=attachments,
            blocker=None if blocker is None else Blocker.from_json(blocker, f"{where}.blocker"),
            message_id=_json_str(data, "message_id", where, nullable=True),
            date=_json_str(data, "date", where, nullable=True),
            reasons=_json_strings(data, "reasons", where),
            watch_reason=_json_str(data, "watch_reason", where, nullable=True),
            headers=MappingProxyType(dict(headers)),
        )


_CHANGE_KEYS = frozenset({"field", "name", "removed", "added"})
_COMMENT_KEYS = frozenset({"number", "author", "author_name", "text"})
_ATTACHMENT_KEYS = frozenset({"id", "description"})
_BLOCKER_KEYS = frozenset({"bug_id", "summary"})
_EVENT_KEYS = frozenset(BugEvent(0, "", "", "", "", "new", "").to_json())
_EVENT_TYPES = frozenset({"new", "changed", "dep_changed", "comment", "attachment"})


# --- text hygiene -------------------------------------------------------


def _control_table(keep_newlines: bool) -> dict[int, str | None]:
    table: dict[int, str | None] = {}
    for code in list(range(0x00, 0x20)) + [0x7F] + list(range(0x80, 0xA0)):
        table[code] = None
    for code in (0x09, 0x0A, 0x0B, 0x0C, 0x0D):
        table[code] = " "
    if keep_newlines:
        table[0x09] = "\t"
        table[0x0A] = "\n"
    # Line and paragraph separators end lines in some viewers; bidi embedding,
    # override and isolate controls reorder what a log line appears to say.
    table[0x2028] = " " if not keep_newlines else "\n"
    table[0x2029] = " " if not keep_newlines else "\n"
    if not keep_newlines:
        for code in list(range(0x202A, 0x202F)) + list(range(0x2066, 0x206A)):
            table[code] = None
        table[0xFEFF] = None
    return table


_LINE_TABLE = _control_table(keep_newlines=False)
_TEXT_TABLE = _control_table(keep_newlines=True)


def _table_pattern(table: dict[int, str | None]) -> re.Pattern[str]:
    """
    A pattern finding any character C{table} changes (so text without one
    skips C{str.translate}, which looks up every character in the table).
    """
    changed = [code for code, replacement in table.items() if replacement != chr(code)]
    return re.compile("[" + "".join(re.escape(chr(code)) for code in sorted(changed)) + "]")


_LINE_SPECIAL = _table_pattern(_LINE_TABLE)
_TEXT_SPECIAL = _table_pattern(_TEXT_TABLE)


def _clean_line(value: str) -> str:
    """
    Return C{value} as one line: control, bidi-override and line-separator
    characters removed or turned into spaces, outer white space stripped.
    """
    if _LINE_SPECIAL.search(value) is None:
        return value.strip()
    return value.translate(_LINE_TABLE).strip()


def _clean_text(value: str) -> str:
    """
    Return multi-line text with newline and tab kept, the other white-space
    controls (vertical tab, form feed, carriage return) turned into spaces and
    every other control character removed.
    """
    if _TEXT_SPECIAL.search(value) is None:
        return value
    return value.translate(_TEXT_TABLE)


def _excerpt(value: str, limit: int = 60) -> str:
    """
    Return a short, safe excerpt of hostile text for an error message.
    """
    cleaned = _clean_line(value)
    if len(cleaned) > limit:
        cleaned = cleaned[:limit] + "..."
    return repr(cleaned)


# --- charsets and transfer encodings ------------------------------------


def _charset_aliases() -> dict[str, str]:
    aliases = {
        "utf-8": "utf-8",
        "utf8": "utf-8",
        # Mail labelled ASCII very often carries UTF-8; decoding it as UTF-8
        # is a superset and loses nothing.
        "us-ascii": "utf-8",
        "ascii": "utf-8",
        "latin1": "latin-1",
        "latin-1": "latin-1",
        "koi8-r": "koi8_r",
        "koi8-u": "koi8_u",
        "gb2312": "gb2312",
        "gbk": "gbk",
        "gb18030": "gb18030",
        "big5": "big5",
        "euc-jp": "euc_jp",
        "shift-jis": "shift_jis",
        "iso-2022-jp": "iso2022_jp",
        "euc-kr": "euc_kr",
    }
    for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 13, 14, 15, 16):
        aliases[f"iso-8859-{n}"] = f"iso8859_{n}"
        aliases[f"iso8859-{n}"] = f"iso8859_{n}"
    for n in range(1250, 1259):
        aliases[f"windows-{n}"] = f"cp{n}"
        aliases[f"cp{n}"] = f"cp{n}"
    return aliases


# Only these codecs are ever used: an arbitrary codec name from a mail could
# select a slow or surprising decoder (for example punycode).
_CHARSETS: Mapping[str, str] = MappingProxyType(_charset_aliases())


def _decode_bytes(data: bytes, charset: str | None) -> str:
    """
    Decode C{data} with C{charset} if it is on the allow-list, else as UTF-8;
    undecodable bytes become U+FFFD.
    """
    codec = "utf-8"
    if charset:
        codec = _CHARSETS.get(charset.strip().strip('"').lower().replace("_", "-"), "utf-8")
    try:
        return data.decode(codec, "replace")
    except (LookupError, ValueError):
        return data.decode("utf-8", "replace")


_BASE64_JUNK = re.compile(rb"[^A-Za-z0-9+/]+")


def _decode_base64(data: bytes) -> bytes:
    """
    Decode base64 leniently: stray characters are ignored, padding repaired.
    """
    cleaned = _BASE64_JUNK.sub(b"", data)
    rest = len(cleaned) % 4
    if rest == 1:
        cleaned = cleaned[:-1]
    elif rest:
        cleaned += b"=" * (4 - rest)
    try:
        return binascii.a2b_base64(cleaned)
    except (binascii.Error, ValueError):
        return b""


def _decode_transfer(data: bytes, encoding: str) -> bytes:
    """
    Undo a Content-Transfer-Encoding; unknown encodings are taken as they are.
    """
    if encoding == "base64":
        return _decode_base64(data)
    if encoding == "quoted-printable":
        try:
            return binascii.a2b_qp(data)
        except (binascii.Error, ValueError):
            return data
    return data


_ENCODED_WORD = re.compile(r"=\?([^?\s]{1,64})\?([QqBb])\?([^?\s]*)\?=")


def _decode_rfc2047(value: str) -> str:
    """
    Decode RFC 2047 encoded words; white space between adjacent encoded words
    is dropped, malformed words are left as they are.
    """
    if "=?" not in value:
        return value
    out: list[str] = []
    pos = 0
    previous_was_word = False
    for m in _ENCODED_WORD.finditer(value):
        gap = value[pos : m.start()]
        if not (previous_was_word and gap.strip() == ""):
            out.append(gap)
        charset = m.group(1).split("*", 1)[0]
        payload = m.group(3).encode("ascii", "replace")
        if m.group(2) in "Bb":
            raw = _decode_base64(payload)
        else:
            try:
                raw = binascii.a2b_qp(payload, header=True)
            except (binascii.Error, ValueError):
                raw = payload
        out.append(_decode_bytes(raw, charset))
        pos = m.end()
        previous_was_word = True
    out.append(value[pos:])
    return "".join(out)


# --- header blocks and MIME ---------------------------------------------

_HEADER_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]{1,128}")
# One field of a header block: its name, and its value with the white space
# after the colon dropped and its continuation lines kept, LF-terminated.
# Every quantifier is possessive: there is one way to read a field, and a
# hostile block fails to match in linear time, without backtracking.
_HEADER_FIELD = rb"([\x21-\x39\x3b-\x7e]{1,128}+):[ \t]*+([^\n]*+(?:\n[ \t][^\n]*+)*+)\n"
_FIELDS_ONLY = re.compile(rb"(?:%s)++" % _HEADER_FIELD)
_FIELD_PARTS = re.compile(_HEADER_FIELD).findall


# Field names as they appear, lower-cased as text: most mails have the same
# few dozen.  Bounded, as names come from the mail.
_LOWER_NAMES: dict[bytes, str] = {}


def _lower_name(name: bytes) -> str:
    """
    A field name (ASCII, as the pattern allows only that) in lower case,
    remembered.
    """
    text = name.decode("ascii").lower()
    if len(_LOWER_NAMES) >= 4096:
        _LOWER_NAMES.clear()
    _LOWER_NAMES[name] = text
    return text


class _Fields(list[tuple[str, bytes]]):
    """
    The fields of a header block, in order, as (lower-case name, raw value);
    L{first} finds the first value of a name without a scan.
    """

    __slots__ = ("_index",)
    _index: dict[str, bytes]

    def first(self, name: str) -> bytes | None:
        """
        The value of the first field called C{name}, or C{None}.
        """
        try:
            index = self._index
        except AttributeError:
            # Reversed, so the first of fields with the same name wins.
            index = self._index = dict(reversed(self))
        return index.get(name)


def _parse_header_block(data: bytes, start: int) -> tuple[_Fields, int]:
    """
    Read the header block that starts at C{start} of LF-normalised C{data}.

    Return the fields as (lower-case name, raw value with folds as LF) in order
    and the offset where the body starts.  As in RFC 5322, the block ends at the
    first empty line, or at the first line that is neither a field nor a
    continuation.
    """
    blank = data.find(b"\n\n", start)
    if (
        blank > start
        and blank + 1 - start <= MAX_HEADER_BLOCK_BYTES
        and data.count(b"\n", start, blank + 1) < MAX_HEADER_LINES
        and _FIELDS_ONLY.fullmatch(data, start, blank + 1) is not None
    ):
        # The common case: a block within the limits, made of fields only
        # and ended by an empty line, read with two scans of a pattern; it
        # gives what the line-by-line reading gives.
        return (
            _Fields([
                (_LOWER_NAMES.get(name) or _lower_name(name), value)
                for name, value in _FIELD_PARTS(data, start, blank + 1)
            ]),
            min(blank + 2, len(data)),
        )
    return _parse_header_block_by_line(data, start)


def _parse_header_block_by_line(data: bytes, start: int) -> tuple[_Fields, int]:
    """
    L{_parse_header_block} line by line, for every block (limits, lines that
    end the block early, no empty line).
    """


    size = len(data)
    if start >= size:
        return _Fields(), size
    if data[start] == 0x0A:
        return _Fields(), start + 1
    # Every line before the first empty one, split in one step.
    blank = data.find(b"\n\n", start)
    fields: list[tuple[str, list[bytes]]] = []
    pos = start
    lines = 0
    header_name = _HEADER_NAME.fullmatch
    for line in data[start : blank if blank >= 0 else size].split(b"\n"):
        if pos >= size:
            break
        end = pos + len(line)
        if end - start > MAX_HEADER_BLOCK_BYTES:
            raise MalformedBugmail(
                f"header block larger than {MAX_HEADER_BLOCK_BYTES} bytes", code="header_too_large"
            )
        lines += 1
        if lines > MAX_HEADER_LINES:
            raise MalformedBugmail(
                f"header block has more than {MAX_HEADER_LINES} lines", code="too_many_header_lines"
            )
        first = line[0]
        if first == 0x20 or first == 0x09:
            if fields:
                fields[-1][1].append(line)
        else:
            colon = line.find(b":")
            if colon <= 0 or not header_name(line, 0, colon):
                return _Fields([(n, b"\n".join(v)) for n, v in fields]), pos
            fields.append((line[:colon].decode("ascii").lower(), [line[colon + 1 :].lstrip(b" \t")]))
        pos = end + 1
    if blank >= 0:
        # The empty line that ends the block, which counts too.
        if blank + 1 - start > MAX_HEADER_BLOCK_BYTES:
            raise MalformedBugmail(
                f"header block larger than {MAX_HEADER_BLOCK_BYTES} bytes", code="header_too_large"
            )
        if lines + 1 > MAX_HEADER_LINES:
            raise MalformedBugmail(
                f"header block has more than {MAX_HEADER_LINES} lines", code="too_many_header_lines"
            )
        return _Fields([(n, b"\n".join(v)) for n, v in fields]), min(blank + 2, size)
    return _Fields([(n, b"\n".join(v)) for n, v in fields]), min(pos, size)


def _first(fields: Sequence[tuple[str, bytes]], name: str) -> bytes | None:
    if isinstance(fields, _Fields):
        return fields.first(name)
    for field_name, value in fields:
        if field_name == name:
            return value
    return None


def _checked_value(value: bytes, name: str) -> bytes:
    if len(value) > MAX_HEADER_VALUE_BYTES:
        raise MalformedBugmail(
            f"{name} header longer than {MAX_HEADER_VALUE_BYTES} bytes", code="header_too_long"
        )
    return value


def _header_text(value: bytes, name: str) -> str:
    """
    Decode one raw header value: 8-bit bytes as UTF-8, folds removed, RFC 2047
    words decoded, control characters removed.
    """
    if len(value) > MAX_HEADER_VALUE_BYTES:
        _checked_value(value, name)  # raises
    text = value.decode("utf-8", "replace")
    if "\n" in text:
        text = text.replace("\n", "")
    if "=?" in text:
        text = _decode_rfc2047(text)
    if _LINE_SPECIAL.search(text) is not None:
        text = text.translate(_LINE_TABLE)
    return text.strip()


def _parse_content_type(value: bytes | None, default: str) -> tuple[str, dict[str, str]]:
    """
    Return the lower-case media type and the parameters of a Content-Type value.
    """
    if value is None:
        return default, {}
    text = _checked_value(value, "Content-Type").decode("latin-1").replace("\n", "")
    main, _, rest = text.partition(";")
    ctype = main.strip().lower()
    if ctype.count("/") != 1 or " " in ctype:
        ctype = "text/plain"
    params: dict[str, str] = {}
    i = 0
    n = len(rest)
    count = 0
    while i < n:
        while i < n and rest[i] in " \t;":
            i += 1
        if i >= n:
            break
        count += 1
        if count > MAX_CONTENT_TYPE_PARAMS:
            raise MalformedBugmail(
                f"Content-Type has more than {MAX_CONTENT_TYPE_PARAMS} parameters",
                code="too_many_parameters",
            )
        j = i
        while j < n and rest[j] not in "=;":
            j += 1
        pname = rest[i:j].strip().lower()
        if j >= n or rest[j] == ";":
            i = j
            continue
        j += 1
        while j < n and rest[j] in " \t":
            j += 1
        if j < n and rest[j] == '"':
            j += 1
            chars: list[str] = []
            while j < n and rest[j] != '"':
                if rest[j] == "\\" and j + 1 < n:
                    j += 1
                chars.append(rest[j])
                j += 1
            pvalue = "".join(chars)
            j += 1
            while j < n and rest[j] != ";":
                j += 1
        else:
            k = j
            while j < n and rest[j] != ";":
                j += 1
            pvalue = rest[k:j].strip()
        params.setdefault(pname, pvalue)
        i = j
    return ctype, params


def _split_multipart(body: bytes, boundary: bytes, budget: list[int]) -> list[bytes]:
    """
    Split a multipart body on its delimiter lines (RFC 2046).  A missing close
    delimiter ends the last part at the end of the data; preamble and epilogue
    are dropped.  C{budget} holds the number of parts still allowed.
    """
    delimiter = b"--" + boundary
    parts: list[bytes] = []
    size = len(body)
    pos = 0
    start: int | None = None
    while True:
        i = body.find(delimiter, pos)
        if i < 0:
            break
        if i > 0 and body[i - 1] != 0x0A:
            pos = i + 1
            continue
        eol = body.find(b"\n", i)
        if eol < 0:
            eol = size
        tail = body[i + len(delimiter) : eol]
        closing = tail.startswith(b"--")
        if closing:
            tail = tail[2:]
        if tail.strip(b" \t"):
            pos = eol
            continue
        if start is not None:
            parts.append(body[start : max(start, i - 1)])
            budget[0] -= 1
            if budget[0] < 0:
                raise MalformedBugmail(
                    f"more than {MAX_MIME_PARTS} MIME parts", code="too_many_parts"
                )
        if closing:
            return parts
        start = eol + 1
        pos = start
    if start is not None and start < size:
        parts.append(body[start:])
        budget[0] -= 1
        if budget[0] < 0:
            raise MalformedBugmail(f"more than {MAX_MIME_PARTS} MIME parts", code="too_many_parts")
    return parts


@dataclass
class _Leaf:
    ctype: str
    params: dict[str, str]
    fields: list[tuple[str, bytes]]
    body: bytes


def _collect_leaves(
    fields: list[tuple[str, bytes]],
    body: bytes,
    default: str,
    depth: int,
    budget: list[int],
    leaves: list[_Leaf],
) -> None:
    """
    Walk one MIME entity, appending its non-multipart leaves to C{leaves}.
    """
    ctype, params = _parse_content_type(_first(fields, "content-type"), default)
    if not ctype.startswith("multipart/"):
        leaves.append(_Leaf(ctype, params, fields, body))
        return
    if depth >= MAX_MIME_DEPTH:
        raise MalformedBugmail(f"MIME nesting deeper than {MAX_MIME_DEPTH}", code="mime_too_deep")
    boundary = params.get("boundary", "").rstrip()
    if not boundary or len(boundary) > 200:
        raise MalformedBugmail("multipart part without a usable boundary", code="bad_mime")
    child_default = "message/rfc822" if ctype == "multipart/digest" else "text/plain"
    for part in _split_multipart(body, boundary.encode("latin-1"), budget):
        part_fields, offset = _parse_header_block(part, 0)
        _collect_leaves(part_fields, part[offset:], child_default, depth + 1, budget, leaves)


def _leaf_text(leaf: _Leaf) -> str:
    """
    Return a text leaf's content, transfer-decoded and charset-decoded, with
    LF line endings and control characters removed.
    """
    cte_raw = _first(leaf.fields, "content-transfer-encoding") or b""
    cte = cte_raw[:64].decode("latin-1").strip().lower()
    data = _decode_transfer(leaf.body, cte)
    text = _decode_bytes(data, leaf.params.get("charset"))
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return _clean_text(text)


def _bug_text(fields: list[tuple[str, bytes]], body: bytes) -> str:
    """
    Find the text/plain part that carries the bugmail (the first one with a
    C{show_bug.cgi} link: Mailman footers and the HTML alternative are skipped)
    and return its decoded text.
    """
    leaves: list[_Leaf] = []
    _collect_leaves(fields, body, "text/plain", 0, [MAX_MIME_PARTS], leaves)
    seen_text = False
    for leaf in leaves:
        if leaf.ctype != "text/plain":
            continue
        disposition = (_first(leaf.fields, "content-disposition") or b"")[:64].lower()
        if disposition.strip().startswith(b"attachment"):
            continue
        seen_text = True
        text = _leaf_text(leaf)
        if "show_bug.cgi?id=" in text:
            return text
    if not seen_text:
        raise MalformedBugmail("no text/plain part (only HTML or attachments)", code="no_text_part")
    raise MalformedBugmail("no text/plain part with a show_bug.cgi link", code="no_bug_link")


# --- body layout --------------------------------------------------------

_URL_LINE = re.compile(r"\s*(\S{0,2000}?show_bug\.cgi\?id=([0-9]{1,12}))\s*")
_COMMENT_HEADER = re.compile(
    r"--- Comment #([0-9]{1,9}) from (.{1,400}?)"
    r"(?: [0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}(?::[0-9]{2})?(?: [A-Za-z]{1,6}| [+-][0-9]{4})?)?"
    r" ---"
)
_LEGACY_NUMBERED = re.compile(r"------- Comment #([0-9]{1,9}) [Ff]rom (\S{1,255})(?:\s+.{0,80}?)? -------")
_LEGACY_ADDITIONAL = re.compile(r"------- Additional [Cc]omments [Ff]rom (\S{1,255})(?:\s+.{0,80}?)? -------")
_CHANGED_BY = re.compile(r"(\S.{0,400}?) changed:")
_TABLE_HEADER = re.compile(r"\s*What\s*\|\s*(?:Removed|Old Value)\s*\|\s*(?:Added|New Value)\s*")
_TABLE_RULE = re.compile(r"-{20,100}")
_DEPENDS = re.compile(r"Bug ([0-9]{1,12}) depends on bug ([0-9]{1,12}), which changed state\.")
_DEP_SUMMARY = re.compile(r"Bug ([0-9]{1,12}) Summary: (.{0,2000})")
_IDENTITY = re.compile(r"(.*?)\s*(?:<([^<>\s]{1,255})>|\(([^()\s]{1,255})\))")
_CREATED = re.compile(
    r"Created (?:an )?attachment (?:\(id=)?([0-9]{1,12})\)?"
    r"(?: \[details\])?(?: \[diff\])?(?: \[review\])?\s*"
)
_CREATED_LINK = re.compile(r"\s*-->\s*\(?\S{0,2000}?attachment\.cgi\?id=([0-9]{1,12})\S{0,200}?\)?\s*")
_REF_BUG_LINE = re.compile(r"\[[A-Za-z][\w -]{0,30} [0-9]{1,12}\] .*")
_SUBJECT = re.compile(
    r"((?:\s*(?:\[[^\[\]]{0,100}\]|[A-Za-z]{1,4}:))*?)\s*"
    r"\[([A-Za-z][\w -]{0,30}) ([0-9]{1,12})\]\s?(New: )?(.*)",
    re.S,
)
_FOOTER_MARKERS = re.compile(
    "You are receiving this mail because|You may reply to this email|Configure bugmail|Do not reply to this email"
)
_MAX_STRUCTURE_LINE = 2100
_TRIPLE_WIDTHS = (18, 27)
_DOUBLE_WIDTH = 54


#: Finds a character for which str.isspace() is true (re's \s for text
#: patterns is exactly that set), without a Python step per character.
_SPACE = re.compile(r"\s").search


def _bug_id(digits: str, what: str) -> int:
    if not digits.isascii() or not digits.isdigit() or len(digits) > 10:
        raise MalformedBugmail(f"{what} is not a bug id: {_excerpt(digits)}", code="bad_bug_id")
    value = int(digits)
    if not 0 < value <= MAX_ID:
        raise MalformedBugmail(f"{what} is out of range: {value}", code="bad_bug_id")
    return value


def _split_identity(identity: str) -> tuple[str | None, str | None]:
    """
    Split Bugzilla's identity text into (real name, login).

    It prints C{"Name <login>"} (up to 5.2), C{"Name (login)"} (the master
    line, bugzilla.kernel.org) or a bare C{"login"}.
    """
    m = _IDENTITY.fullmatch(identity)
    if m is not None:
        login = m.group(2) or m.group(3)
        return (m.group(1) or None), login
    if identity and _SPACE(identity) is None:
        return None, identity
    return None, None


def _join_pieces(pieces: Sequence[str], width: int) -> str:
    """
    Re-join the pieces of a value Bugzilla wrapped into a column of C{width}.

    Perl's Text::Wrap breaks at white space (dropping one space) whenever it
    can, and splits a token hard only when no break fits; so a piece that
    fills the column and contains no white space was split hard and joins
    without a space, every other piece joins with one.
    """
    out = ""
    previous: str | None = None
    for piece in pieces:
        if not piece:
            continue
        if previous is None:
            out = piece
        elif len(previous) >= width and _SPACE(previous) is None:
            out += piece
        else:
            out += " " + piece
        previous = piece
    return out


def _triple(line: str) -> tuple[str, str, str] | None:
    """
    Split one line of the change table (C{'%19s|%-28s|%-28s'}) by column
    offsets, or return C{None} if the line is not a table row.
    """
    if len(line) < 20 or line[19] != "|" or len(line) > _MAX_STRUCTURE_LINE:
        return None
    label = line[:19].strip()
    if len(line) >= 49 and line[48] == "|":
        removed, added = line[20:48], line[49:]
    else:
        # Characters that are wider in Perl's eyes than in ours can push the
        # second bar right; find it after the removed column's width.
        bar = line.find("|", 48)
        if bar < 0:
            removed, added = line[20:], ""
        else:
            removed, added = line[20:bar], line[bar + 1 :]
    return label, removed.rstrip(), added.rstrip()


def _hard_split(piece: str, width: int) -> bool:
    """
    Whether C{piece} fills a column of C{width} without white space: Perl's
    Text::Wrap split a longer word there, and its rest follows.
    """
    return len(piece) >= width and _SPACE(piece) is None


def _label_continues(
    row: tuple[list[str], list[str], list[str]],
    label: str,
    removed: str,
    added: str,
    changed_fields: frozenset[str] | None,
) -> bool:
    """
    Decide whether a table line with a non-empty label continues a wrapped
    label (labels wrap at 18 characters, e.g. C{"Attachment #310101 Flags"})
    rather than starting a new row.

    @param changed_fields: The words of the mail's changed-fields header,
        or C{None} when it has none.
    """
    pieces = row[0]
    previous = pieces[-1]
    if not previous:
        return False
    words = label.split()
    first = words[0] if words else label
    hard = len(previous) >= _TRIPLE_WIDTHS[0] and " " not in previous
    soft = len(previous) + 1 + len(first) > _TRIPLE_WIDTHS[0]
    if not (hard or soft):
        return False
    if not removed and not added:
        return True
    # Rows carrying values on both lines: only labels known to be incomplete
    # (an attachment or comment number without a complete field description)
    # and custom labels under a value that goes on (below) are continued;
    # anything else starts a new row.
    joined = " ".join(pieces)
    if joined in ("Attachment", "Comment"):
        return label.startswith("#")
    m = _NUMBERED_LABEL.fullmatch(joined)
    if m is not None:
        return (m.group(1) or "") not in _COMPLETE_SUFFIXES
    if joined in _FIELD_NAMES:
        return False
    if _NUMBERED_LABEL.match(label) is not None:
        return False
    # A custom field's long label (e.g. "Target Upstream Version") wraps
    # together with its values.  A value piece above that was split hard
    # proves the line continues it (its rest must follow); a word that
    # merely did not fit proves nothing, as a new row (an address under
    # "CC", say) often starts with a long word.
    width = _TRIPLE_WIDTHS[1]
    previous_removed, previous_added = row[1][-1], row[2][-1]
    if (removed and not previous_removed) or (added and not previous_added):
        return False
    if not (removed and _hard_split(previous_removed, width)) and not (
        added and _hard_split(previous_added, width)
    ):
        return False
    # A value of exactly the column's width ends there as if split hard: a
    # stock field's row after it ("Status") is taken as one, unless the
    # mail's changed fields say that field did not change (the tail of
    # "Target Upstream Version" is no change of "version").
    name = _FIELD_NAMES.get(label)
    if name is None:
        return True
    return changed_fields is not None and name not in changed_fields and label not in changed_fields


def _parse_change_table(
    lines: list[str], i: int, changes: list[Change], changed_fields: frozenset[str] | None = None
) -> int:
    """
    Parse the rows of one change table starting at line C{i}; return the index
    of the first line after the table.
    """
    rows: list[tuple[list[str], list[str], list[str]]] = []
    n = len(lines)
    while i < n:
        parsed = _triple(lines[i])
        if parsed is None:
            break
        label, removed, added = parsed
        if rows and (
            not label or _label_continues(rows[-1], label, removed, added, changed_fields)
        ):
            row = rows[-1]
            if label:
                row[0].append(label)
            row[1].append(removed)
            row[2].append(added)
        else:
            rows.append(([label], [removed], [added]))
        i += 1
    for label_pieces, removed_pieces, added_pieces in rows:
        changes.append(
            Change(
                _clean_line(_join_pieces(label_pieces, _TRIPLE_WIDTHS[0])),
                _clean_line(_join_pieces(removed_pieces, _TRIPLE_WIDTHS[1])),
                _clean_line(_join_pieces(added_pieces, _TRIPLE_WIDTHS[1])),
            )
        )
    return i


def _double(line: str) -> tuple[str, str] | None:
    """
    Split one line of the new-bug table (C{'%19s %-55s'}), or return C{None}.
    """
    if len(line) < 21 or line[0] != " " or line[19] != " " or len(line) > _MAX_STRUCTURE_LINE:
        return None
    return line[:19].strip(), line[20:].rstrip()


def _parse_new_table(lines: list[str], i: int) -> tuple[list[tuple[str, str]], int]:
    """
    Parse the two-column table of a new-bug mail starting at line C{i}; return
    its (label, value) rows and the index of the first line after it.
    """
    rows: list[tuple[list[str], list[str]]] = []
    n = len(lines)
    while i < n:
        parsed = _double(lines[i])
        if parsed is None:
            break
        label, value = parsed
        if rows and not rows[-1][0][-1].endswith(":"):
            rows[-1][0].append(label)
            rows[-1][1].append(value)
        elif not label:
            if not rows:
                break
            rows[-1][1].append(value)
        else:
            rows.append(([label], [value]))
        i += 1
    table = []
    for label_pieces, value_pieces in rows:
        label = _clean_line(_join_pieces(label_pieces, _TRIPLE_WIDTHS[0]))
        value = _clean_line(_join_pieces(value_pieces, _DOUBLE_WIDTH))
        table.append((label[:-1] if label.endswith(":") else label, value))
    return table, i


def _comment_header(line: str) -> tuple[int | None, str] | None:
    """
    Recognise a comment header line; return (number, identity) or C{None}.
    """
    if not line.startswith("---") or len(line) > 1000:
        return None
    m = _COMMENT_HEADER.fullmatch(line)
    if m is not None:
        return int(m.group(1)), m.group(2)
    m = _LEGACY_NUMBERED.fullmatch(line)
    if m is not None:
        return int(m.group(1)), m.group(2)
    m = _LEGACY_ADDITIONAL.fullmatch(line)
    if m is not None:
        return None, m.group(1)
    return None


def _find_footer(lines: list[str], start: int) -> int:
    """
    Return the index where Bugzilla's footer (or, failing that, a mailing
    list's footer) begins, so that it is never part of a comment.

    Bugzilla's footer is the last signature line (C{"-- "}) followed within a
    few lines by one of its fixed sentences; a mailing list footer appended
    after it is cut off with it.
    """
    fallback_sig: int | None = None
    next_marker = -1  # nearest line after i holding a footer sentence
    for i in range(len(lines) - 1, start - 1, -1):
        line = lines[i]
        if not line:
            continue
        if line[0] == "-" and len(line) <= 8 and line.rstrip() == "--":
            if 0 < next_marker - i <= 6:
                return i
            if fallback_sig is None:
                fallback_sig = i
        elif len(line) < 200 and _FOOTER_MARKERS.search(line):
            next_marker = i
    for i in range(start, len(lines) - 1):
        line = lines[i]
        if 10 <= len(line) <= 100 and line.strip("_") == "" and "mailing list" in lines[i + 1]:
            return i
    if fallback_sig is not None:
        return fallback_sig
    return len(lines)


def _strip_referenced_bugs(lines: list[str], start: int, end: int) -> int:
    """
    Return the new end of the region if it finishes with Bugzilla's
    "Referenced Bugs:" list (5.0+), else C{end}.
    """
    for i in range(end - 1, start - 1, -1):
        line = lines[i].strip()
        if line == "Referenced Bugs:":
            return i
        if not line or "show_bug.cgi?id=" in line or _REF_BUG_LINE.fullmatch(line[:2000]):
            continue
        return end
    return end


def _trim_blank(lines: list[str]) -> list[str]:
    begin, finish = 0, len(lines)
    while begin < finish and not lines[begin].strip():
        begin += 1
    while finish > begin and not lines[finish - 1].strip():
        finish -= 1
    return lines[begin:finish]


@dataclass
class _Body:
    url: str
    url_bug_id: int
    new_table: list[tuple[str, str]]
    changes: list[Change]
    changers: list[str]
    comments: list[tuple[int | None, str | None, list[str]]]
    blocker: Blocker | None


def _parse_body(text: str, is_new: bool, changed_fields: frozenset[str] | None = None) -> _Body:
    """
    Parse the decoded text part: link line, tables, comments, footer.

    @param changed_fields: The words of the mail's changed-fields header,
        or C{None} when it has none.
    """
    lines = text.split("\n")
    url_index = -1
    url = ""
    url_id = 0
    for i, line in enumerate(lines[:60]):
        if len(line) <= _MAX_STRUCTURE_LINE and "show_bug.cgi?id=" in line:
            m = _URL_LINE.fullmatch(line)
            if m is not None:
                url_index, url, url_id = i, m.group(1), _bug_id(m.group(2), "the show_bug.cgi link")
                break
    if url_index < 0:
        raise MalformedBugmail("no show_bug.cgi link line at the top of the text part", code="no_bug_link")
    end = _find_footer(lines, url_index + 1)
    end = _strip_referenced_bugs(lines, url_index + 1, end)

    body = _Body(url, url_id, [], [], [], [], None)
    i = url_index + 1
    while i < end and not lines[i].strip():
        i += 1

    # Free text before the first comment header: a new bug's description.
    # Change mails have none; there every line up to the first comment header
    # is structure, and nothing after it is ever parsed as a table.
    pending: tuple[int | None, str | None, list[str]] | None = None
    if is_new:
        body.new_table, i = _parse_new_table(lines, i)
        pending = (0, None, [])
    else:
        while i < end:
            line = lines[i]
            i += 1
            if not line or len(line) > _MAX_STRUCTURE_LINE:
                continue
            if line.startswith("---") and _comment_header(line) is not None:
                i -= 1
                break
            if "|" in line:
                if _TABLE_HEADER.fullmatch(line) and i < end and _TABLE_RULE.fullmatch(lines[i]):
                    i = _parse_change_table(lines, i + 1, body.changes, changed_fields)
            elif line.endswith(" changed:"):
                m = _CHANGED_BY.fullmatch(line)
                if m is not None:
                    body.changers.append(m.group(1))
            elif line.startswith("Bug "):
                m = _DEPENDS.fullmatch(line)
                if m is not None:
                    body.blocker = Blocker(_bug_id(m.group(2), "the blocking bug"), "")
                    continue
                m = _DEP_SUMMARY.fullmatch(line)
                if m is not None and body.blocker is not None and m.group(1) == str(body.blocker.bug_id):
                    body.blocker = Blocker(body.blocker.bug_id, m.group(2).strip())

    while i < end:
        line = lines[i]
        i += 1
        header = _comment_header(line) if line.startswith("---") else None
        if (
            header is not None
            and pending is not None
            and header[0] is not None
            and pending[0] is not None
            and header[0] <= pending[0]
        ):
            # Bugzilla lists comments in rising order: an older comment's
            # header is part of a mail pasted into this comment.
            header = None
        if header is not None:
            if pending is not None:
                body.comments.append(pending)
            pending = (header[0], header[1], [])
        elif pending is not None:
            pending[2].append(line)
    if pending is not None:
        body.comments.append(pending)
    return body


def _comment_and_attachment(
    number: int | None, identity: str | None, raw_lines: list[str], default_author: str
) -> tuple[Comment, Attachment | None] | None:
    """
    Build a L{Comment} from its lines, splitting off an attachment notice.
    Return C{None} for an empty implicit description.
    """
    lines = _trim_blank(raw_lines)
    attachment: Attachment | None = None
    if len(lines) >= 2 and len(lines[0]) < 200 and len(lines[1]) <= _MAX_STRUCTURE_LINE:
        created = _CREATED.fullmatch(lines[0])
        link = _CREATED_LINK.fullmatch(lines[1]) if created else None
        if created and link and created.group(1) == link.group(1):
            attachment_id = int(created.group(1))
            k = 2
            description: list[str] = []
            while k < len(lines) and lines[k].strip() and len(description) < 20:
                description.append(lines[k].strip())
                k += 1
            if 0 < attachment_id <= MAX_ID:
                attachment = Attachment(attachment_id, _clean_line(" ".join(description)))
                lines = _trim_blank(lines[k:])
    text = "\n".join(line.rstrip() for line in lines)
    if identity is None and number == 0 and not text and attachment is None:
        return None
    name: str | None = None
    author = default_author
    if identity is not None:
        name, login = _split_identity(identity)
        author = login or _clean_line(identity)
        name = _clean_line(name) if name else None
    return Comment(number, author, text, name or None), attachment


# --- headers ------------------------------------------------------------

_KNOWN_BUGZILLA_HEADERS = (
    "Reason Type Watch-Reason Classification Product Component Sub-Component Version "
    "Keywords Severity ID Who Status Resolution Priority Assigned-To Target-Milestone "
    "Flags Changed-Fields Changed-Field-Names URL Comment Reporter Attach-ID Bug-Type "
    "OS Tracking Mentors FirstPatch Secure-Email Encrypt"
).split()
_CANONICAL: Mapping[str, str] = MappingProxyType(
    {"x-bugzilla-" + name.lower(): "X-Bugzilla-" + name for name in _KNOWN_BUGZILLA_HEADERS}
)
# The same, as a dict: a mappingproxy's get is slower, and this one is private.
_CANONICAL_NAMES = dict(_CANONICAL)
# What _LINE_SPECIAL finds in text that is ASCII, as bytes.
_ASCII_LINE_SPECIAL = re.compile(rb"[\x00-\x1f\x7f]")
_BUGZILLA_SUFFIX = re.compile(r"[a-z0-9][a-z0-9-]{0,40}")
_BUG_EVENT_TYPES = ("new", "changed", "dep_changed", "newchanged")


def _canonical_name(lower: str) -> str | None:
    known = _CANONICAL.get(lower)
    if known is not None:
        return known
    suffix = lower[len("x-bugzilla-") :]
    if not _BUGZILLA_SUFFIX.fullmatch(suffix):
        return None
    return "X-Bugzilla-" + "-".join(word.capitalize() for word in suffix.split("-"))


def _bugzilla_headers(fields: Sequence[tuple[str, bytes]]) -> dict[str, str]:
    """
    Collect the C{X-Bugzilla-*} headers, decoded, under canonical names.
    The same header twice with different values is refused.
    """
    named = [
        (_CANONICAL_NAMES.get(lower) or _canonical_name(lower), raw)
        for lower, raw in fields
        if lower.startswith("x-bugzilla-")
    ]
    names = {name for name, _ in named}
    joined = b"".join([raw for _, raw in named])
    plain = (
        len(joined) <= MAX_HEADER_VALUE_BYTES
        and joined.isascii()
        and _ASCII_LINE_SPECIAL.search(joined) is None
        and b"=?" not in joined
    )
    if plain and len(names) == len(named) <= MAX_BUGZILLA_HEADERS and None not in names:
        # The common case: each header once, with a short printable ASCII
        # value, unfolded and without encoded words, where decoding the
        # values one by one (L{_header_text}) comes down to this, and no
        # header can conflict with another or pass the limit.
        return {cast(str, name): raw.decode("ascii").strip() for name, raw in named}
    found: dict[str, str] = {}
    for name, raw in named:
        if name is None:
            continue
        value = raw.decode("ascii").strip() if plain else _header_text(raw, name)
        if name in found:
            if found[name] != value:
                raise MalformedBugmail(f"conflicting {name} headers", code="conflicting_headers")
            continue
        if len(found) >= MAX_BUGZILLA_HEADERS:
            raise MalformedBugmail(
                f"more than {MAX_BUGZILLA_HEADERS} X-Bugzilla-* headers", code="too_many_headers"
            )
        found[name] = value
    return found


def _optional_header(fields: Sequence[tuple[str, bytes]], lower: str, name: str) -> str | None:
    raw = _first(fields, lower)
    if raw is None:
        return None
    return _header_text(raw, name) or None


def _valid_login(value: str) -> bool:
    return 0 < len(value) <= MAX_LOGIN_CHARS and _SPACE(value) is None


# --- the parser ---------------------------------------------------------


#: The code of the L{MalformedBugmail} a parser failure that is not the
#: mail's is reported with (a bug, or memory running out): the mail's sender
#: keeps it and tries again (L{fedhub.producers.bugzilla.producer.classify_failure}).
INTERNAL_ERROR = "internal_error"


def parse_bugmail(raw: bytes) -> BugEvent:
    """
    Parse one Bugzilla notification mail.

    @param raw: The mail as received (headers and body; CRLF or LF).
    @return: The event the mail describes.
    @raise NotBugmail: The mail is not a Bugzilla bug event.
    @raise MalformedBugmail: It is Bugzilla mail that can not be understood,
        or it exceeds a resource limit.
    @raise TypeError: C{raw} is not a bytes-like object (a programming error).
    """
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise TypeError(f"parse_bugmail() needs bytes, not {type(raw).__name__}")
    try:
        return _parse(bytes(raw))
    except BugmailError:
        raise
    except Exception as e:  # the promise: hostile input never escapes as anything else
        raise MalformedBugmail(
            f"internal error while parsing: {type(e).__name__}", code=INTERNAL_ERROR
        ) from e


def _parse(raw: bytes) -> BugEvent:
    if len(raw) > MAX_MAIL_BYTES:
        raise MalformedBugmail(
            f"mail is {len(raw)} bytes, more than the limit of {MAX_MAIL_BYTES}", code="too_large"
        )
    data = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    start = 0
    if data.startswith(b"From "):
        newline = data.find(b"\n")
        start = len(data) if newline < 0 else newline + 1
    fields, body_offset = _parse_header_block(data, start)

    headers = _bugzilla_headers(fields)
    if not headers and not any(name.startswith("x-bugzilla-") for name, _ in fields):
        if any(name.startswith("x-launchpad-") for name, _ in fields):
            raise NotBugmail(
                "Launchpad bug mail (X-Launchpad-* headers), not Bugzilla: no X-Bugzilla-* headers",
                code="launchpad",
            )
        raise NotBugmail("not Bugzilla mail: no X-Bugzilla-* headers", code="not_bugzilla")

    bz_type = headers.get("X-Bugzilla-Type")
    if bz_type is not None:
        bz_type = bz_type.lower()
        if bz_type not in _BUG_EVENT_TYPES:
            raise NotBugmail(
                f"Bugzilla mail of type {_excerpt(bz_type)}, not a bug change notification",
                code="not_bug_event",
            )
    if "X-Bugzilla-Encrypt" in headers or "X-Bugzilla-Secure-Email" in headers:
        raise MalformedBugmail("encrypted bugmail (secure bug) can not be read", code="encrypted")

    product = headers.get("X-Bugzilla-Product")
    component = headers.get("X-Bugzilla-Component")
    if not product or not component:
        raise MalformedBugmail(
            "no X-Bugzilla-Product or X-Bugzilla-Component header", code="missing_headers"
        )

    subject_raw = _first(fields, "subject")
    subject = _header_text(subject_raw, "Subject") if subject_raw is not None else ""
    m = _SUBJECT.match(subject)
    if m is None:
        raise MalformedBugmail(
            f"Subject does not name a bug ('[Bug N] summary'): {_excerpt(subject)}", code="bad_subject"
        )
    subject_id = _bug_id(m.group(3), "the Subject's bug id")
    has_new_prefix = m.group(4) is not None

    text = _bug_text(fields, data[body_offset:])

    changed_fields_raw = headers.get("X-Bugzilla-Changed-Fields", "")
    if bz_type in ("new", "changed", "dep_changed"):
        is_new = bz_type == "new"
    else:
        # Bugzilla 3.0-3.2 ("newchanged") and 2.x (no type header): a new bug
        # shows "New:" in the Subject, 2.x also "Changed-Fields: New".
        is_new = has_new_prefix or changed_fields_raw.strip().lower() == "new"

    listed = headers.get("X-Bugzilla-Changed-Field-Names", headers.get("X-Bugzilla-Changed-Fields"))
    body = _parse_body(text, is_new, None if listed is None else frozenset(listed.split()))
    if body.url_bug_id != subject_id:
        raise MalformedBugmail(
            f"the Subject names bug {subject_id} but the link names bug {body.url_bug_id}",
            code="bug_id_mismatch",
        )
    if "X-Bugzilla-ID" in headers and headers["X-Bugzilla-ID"] != str(subject_id):
        raise MalformedBugmail(
            f"X-Bugzilla-ID {_excerpt(headers['X-Bugzilla-ID'])} does not match bug {subject_id}",
            code="bug_id_mismatch",
        )
    summary = m.group(5).strip()
    if has_new_prefix and not is_new:
        summary = "New: " + summary

    table = dict(body.new_table)
    who = headers.get("X-Bugzilla-Who")
    if who:
        if not _valid_login(who):
            raise MalformedBugmail(f"X-Bugzilla-Who is not a login: {_excerpt(who)}", code="bad_who")
    else:
        who = _legacy_who(body, table)

    comments: list[Comment] = []
    attachments: list[Attachment] = []
    for number, identity, lines in body.comments:
        built = _comment_and_attachment(number, identity, lines, who)
        if built is None:
            continue
        comments.append(built[0])
        if built[1] is not None:
            attachments.append(built[1])

    if is_new:
        changes = [Change(label, "", value) for label, value in body.new_table]
    else:
        changes = body.changes
    event_type = _event_type(bz_type, is_new, changes, comments, attachments)

    def from_header_or_table(name: str, *labels: str) -> str | None:
        if name in headers:
            return headers[name]
        for label in labels:
            if label in table:
                return _clean_line(table[label])
        return None

    names_header = headers.get("X-Bugzilla-Changed-Field-Names")
    changed_fields = (names_header if names_header is not None else changed_fields_raw).split()
    if bz_type is None and changed_fields == ["New"]:
        changed_fields = []  # the 2.x new-bug marker, not a field
    reasons = tuple(r for r in headers.get("X-Bugzilla-Reason", "").split() if r != "None")
    watch_reason = headers.get("X-Bugzilla-Watch-Reason")
    source = headers.get("X-Bugzilla-URL")
    if not source:
        source = body.url[: body.url.index("show_bug.cgi")] or None
    return BugEvent(
        bug_id=subject_id,
        summary=summary,
        product=product,
        component=component,
        who=who,
        event_type=event_type,
        url=_clean_line(body.url),
        who_name=_who_name(who, body, comments),
        source=source,
        classification=headers.get("X-Bugzilla-Classification"),
        version=from_header_or_table("X-Bugzilla-Version", "Version"),
        status=from_header_or_table("X-Bugzilla-Status", "Status"),
        resolution=from_header_or_table("X-Bugzilla-Resolution", "Resolution"),
        priority=from_header_or_table("X-Bugzilla-Priority", "Priority"),
        severity=from_header_or_table("X-Bugzilla-Severity", "Severity"),
        assignee=from_header_or_table("X-Bugzilla-Assigned-To", "Assignee", "AssignedTo"),
        target_milestone=headers.get("X-Bugzilla-Target-Milestone"),
        keywords=tuple(k.strip() for k in headers.get("X-Bugzilla-Keywords", "").split(",") if k.strip()),
        flags=tuple(headers.get("X-Bugzilla-Flags", "").split()),
        changed_fields=tuple(changed_fields),
        changes=tuple(changes),
        comments=tuple(comments),
        attachments=tuple(attachments),
        blocker=body.blocker,
        message_id=_optional_header(fields, "message-id", "Message-ID"),
        date=_optional_header(fields, "date", "Date"),
        reasons=reasons,
        watch_reason=None if watch_reason in (None, "", "None") else watch_reason,
        headers=MappingProxyType(headers),
    )


def _legacy_who(body: _Body, table: Mapping[str, str]) -> str:
    """
    Find the changer in the body of mail without C{X-Bugzilla-Who} (2.x):
    the reporter of a new bug, else the first "changed:" line or comment.
    """
    candidates: list[str] = []
    for label in ("Reporter", "ReportedBy"):
        if label in table:
            candidates.append(_clean_line(table[label]))
    for identity in body.changers + [c[1] for c in body.comments if c[1] is not None]:
        login = _split_identity(identity)[1]
        if login:
            candidates.append(_clean_line(login))
    for candidate in candidates:
        if _valid_login(candidate):
            return candidate
    raise MalformedBugmail("no X-Bugzilla-Who header and no changer named in the body", code="no_who")


def _who_name(who: str, body: _Body, comments: Sequence[Comment]) -> str | None:
    """
    Return the changer's real name when a "changed:" line or a comment header
    shows it next to the changer's login.
    """
    for identity in body.changers:
        name, login = _split_identity(identity)
        if name and login and login.lower() == who.lower():
            return _clean_line(name) or None
    for comment in comments:
        if comment.author_name and comment.author.lower() == who.lower():
            return comment.author_name
    return None


def _event_type(
    bz_type: str | None,
    is_new: bool,
    changes: Sequence[Change],
    comments: Sequence[Comment],
    attachments: Sequence[Attachment],
) -> EventType:
    """
    Classify the event.  Rows about an attachment the same mail creates (its
    flags, say) do not make an attachment event a field change.
    """
    if bz_type == "dep_changed":
        return "dep_changed"
    if is_new:
        return "new"
    created = {a.id for a in attachments}
    own_rows = 0
    for change in changes:
        m = _ATTACHMENT_LABEL.fullmatch(change.field)
        if m is not None and int(m.group(1)) in created:
            own_rows += 1
    if len(changes) > own_rows:
        return "changed"
    if attachments:
        return "attachment"
    if comments:
        return "comment"
    return "changed"
