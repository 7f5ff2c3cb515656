"""
Tests for L{fedhub.producers.bugzilla.parser}: the real sample mails give the
results documented for them, CRLF mail parses like LF mail, and each layout
rule, rejection reason and resource limit behaves as documented.
"""

# twisted.trial's assertion methods carry no annotations.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from fedhub.errors import FedhubError
from fedhub.producers.bugzilla import parser
from fedhub.producers.bugzilla.parser import (
    MAX_CONTENT_TYPE_PARAMS,
    MAX_HEADER_LINES,
    MAX_MAIL_BYTES,
    MAX_MIME_DEPTH,
    MAX_MIME_PARTS,
    Attachment,
    Blocker,
    BugEvent,
    BugmailError,
    Change,
    Comment,
    MalformedBugmail,
    NotBugmail,
    parse_bugmail,
)

DATA = Path(__file__).parent / "data" / "bugzilla"
SAMPLES = sorted(p.name for p in DATA.glob("*.eml"))

FOOTER = "\n-- \nYou are receiving this mail because:\nYou are watching all bug changes.\n"
TABLE_HEAD = (
    "           What    |Removed                     |Added\n"
    "----------------------------------------------------------------------------\n"
)


def _sample(name: str) -> bytes:
    return (DATA / name).read_bytes()


def _parse_sample(name: str) -> BugEvent:
    return parse_bugmail(_sample(name))


def _mail(
    body: str = "",
    *,
    bug_id: int = 4242,
    summary: str = "Widget explodes",
    bz_type: str | None = "changed",
    who: str | None = "alice@example.org",
    subject: str | None = None,
    headers: tuple[tuple[str, str], ...] = (),
    url: str = "https://bz.example.org/",
    footer: str = FOOTER,
    link: str | None = None,
) -> bytes:
    """
    Build a plain-text bugmail around C{body} the way Bugzilla 5 lays it out.
    """
    lines = [
        "From: bugzilla-daemon@example.org",
        "To: watcher@example.org",
        f"Subject: {subject if subject is not None else f'[Bug {bug_id}] {summary}'}",
        "Date: Tue, 23 Jan 2024 14:05:09 +0000",
        "X-Bugzilla-Reason: None",
    ]
    if bz_type is not None:
        lines.append(f"X-Bugzilla-Type: {bz_type}")
    lines += [
        "X-Bugzilla-Watch-Reason: None",
        "X-Bugzilla-Product: Gadgets",
        "X-Bugzilla-Component: Widgets",
    ]
    if who is not None:
        lines.append(f"X-Bugzilla-Who: {who}")
    lines += [
        "X-Bugzilla-Status: NEW",
        "X-Bugzilla-Flags: ",
        f"Message-ID: <bug-{bug_id}-7-AbCdEfGhIj@https.bz.example.org/>",
        'Content-Type: text/plain; charset="UTF-8"',
        "Content-Transfer-Encoding: 8bit",
        f"X-Bugzilla-URL: {url}",
        "MIME-Version: 1.0",
    ]
    lines += [f"{name}: {value}" for name, value in headers]
    if link is None:
        link = f"{url}show_bug.cgi?id={bug_id}"
    text = f"{link}\n\n{body}{footer}"
    return ("\n".join(lines) + "\n\n" + text).encode("utf-8")


def _error(raw: bytes) -> BugmailError:
    try:
        event = parse_bugmail(raw)
    except BugmailError as e:
        return e
    raise AssertionError(f"parsed without error: {event!r}")


class SampleMailTests(SynchronousTestCase):
    """
    Every sample in C{tests/data/bugzilla} gives the result documented for it.
    """

    def test_01_new_bug_with_attachment(self) -> None:
        """A text/plain new-bug mail gives the bug, its new-bug table as changes and its attachment."""
        event = _parse_sample("01_new_bug_textplain_attachment.eml")
        self.assertEqual(event.bug_id, 221510)
        self.assertEqual(
            event.summary,
            "CalDigit TS5+ Thunderbolt rear USB controller fails to enumerate on AMD Strix Point USB4 host",
        )
        self.assertEqual((event.product, event.component), ("Drivers", "USB"))
        self.assertEqual(event.event_type, "new")
        self.assertEqual(event.who, "bugzilla-kernel@andrewzah.com")
        for change in [
            Change("Status", "", "NEW"),
            Change("Severity", "", "normal"),
            Change("Priority", "", "P3"),
            Change("Regression", "", "No"),
            Change(
                "Summary",
                "",
                "CalDigit TS5+ Thunderbolt rear USB controller fails to enumerate on AMD Strix Point USB4 host",
            ),
        ]:
            self.assertIn(change, event.changes)
        self.assertEqual(
            event.attachments, (Attachment(310101, "dmesg,lsusb,lspci,tbadm etc debug output"),)
        )
        self.assertEqual(event.attachment, Attachment(310101, "dmesg,lsusb,lspci,tbadm etc debug output"))
        comment = event.comment
        assert comment is not None
        self.assertEqual((comment.number, comment.author), (0, "bugzilla-kernel@andrewzah.com"))
        self.assertTrue(comment.text.startswith("I have a webcam connected to the rear usb hub"))
        self.assertIn("fails to enumerate on linux, however it does light up and activate when plugged\nin.", comment.text)
        self.assertTrue(comment.text.endswith("into the front USB-C port on the same dock."))
        self.assertNotIn("Created attachment", comment.text)
        self.assertNotIn("You may reply", comment.text)
        self.assertEqual((event.status, event.priority, event.severity), ("NEW", "P3", "normal"))
        self.assertEqual(event.resolution, "")
        self.assertEqual(event.changed_fields[-2:], ("cf_regression", "attachments.created"))
        self.assertEqual(event.url, "https://bugzilla.kernel.org/show_bug.cgi?id=221510")
        self.assertEqual(event.source, "https://bugzilla.kernel.org/")
        self.assertEqual(event.message_id, "<bug-221510-208809@https.bugzilla.kernel.org/>")
        self.assertEqual(
            event.summary_line(),
            "bugzilla-kernel@andrewzah.com filed bug 221510 'CalDigit TS5+ Thunderbolt rear USB"
            " controller fails to enumerate on AMD Strix Point USB4 host'",
        )

    def test_02_new_bug_multipart_in_mailman_wrapper(self) -> None:
        """The text alternative inside a Mailman multipart/mixed is used; HTML and the list footer are not."""
        event = _parse_sample("02_new_bug_multipart_html.eml")
        self.assertEqual(event.bug_id, 111229)
        self.assertEqual(event.summary, "Unable to unbind GPU from amdgpu")
        self.assertEqual((event.product, event.component), ("DRI", "DRM/AMDgpu"))
        self.assertEqual(event.event_type, "new")
        self.assertEqual(event.attachments, (Attachment(144877, "dmesg kernel 5.2.1"),))
        self.assertIn(Change("Hardware", "", "x86-64 (AMD64)"), event.changes)
        comment = event.comment
        assert comment is not None
        self.assertEqual((comment.number, comment.author), (0, "wedens13@yandex.ru"))
        self.assertTrue(comment.text.startswith("Arch linux\nKernel version: 5.2.1\n"))
        self.assertTrue(comment.text.endswith("different from 5.2.1)."))
        self.assertIn('echo -n "0000:03:00.0" > /sys/bus/pci/drivers/amdgpu/unbind', comment.text)
        for leaked in ("<html>", "&quot;", "mailing list", "You are receiving"):
            self.assertNotIn(leaked, comment.text)
        self.assertEqual(event.reasons, ("AssignedTo",))
        self.assertIsNone(event.watch_reason)

    def test_04_status_and_resolution_change_with_comment(self) -> None:
        """Status and resolution rows and comment #5 are parsed; the changer's name comes from the body."""
        event = _parse_sample("04_changed_status_resolution_with_comment.eml")
        self.assertEqual(event.bug_id, 218297)
        self.assertEqual((event.product, event.component), ("Virtualization", "kvm"))
        self.assertEqual(event.event_type, "changed")
        self.assertEqual(
            event.changes,
            (Change("Status", "RESOLVED", "REOPENED"), Change("Resolution", "ANSWERED", "---")),
        )
        self.assertEqual(
            event.comments,
            (
                Comment(
                    5,
                    "awaneeshkmr@gmail.com",
                    "We have migrated to kernel - 5.4.254. Can someone point to the patch, we can\n"
                    "apply for the above issue?",
                    "Awaneesh",
                ),
            ),
        )
        self.assertEqual((event.who, event.who_name), ("awaneeshkmr@gmail.com", "Awaneesh"))
        self.assertEqual(
            event.summary_line(),
            "awaneeshkmr@gmail.com updated status, resolution on bug 218297 'Kernel Panic and crash'",
        )
        self.assertEqual([c.name for c in event.changes], ["bug_status", "resolution"])

    def test_05_quoted_old_bugmail_is_not_parsed(self) -> None:
        """A comment quoting an older bugmail's change table yields no changes; the quote stays in the text."""
        event = _parse_sample("05_comment_only_quoting_old_bugmail.eml")
        self.assertEqual(event.bug_id, 217604)
        self.assertEqual((event.product, event.component), ("File System", "XFS"))
        self.assertEqual(event.changes, ())
        self.assertEqual(event.changed_fields, ())
        self.assertEqual(event.event_type, "comment")
        self.assertEqual(len(event.comments), 1)
        comment = event.comments[0]
        self.assertEqual((comment.number, comment.author), (3, "djwong@kernel.org"))
        self.assertEqual(comment.author_name, "Darrick J. Wong")
        self.assertTrue(comment.text.startswith("On Thu, Jun 29, 2023 at 07:10:35AM +0000, bugzilla-daemon"))
        self.assertIn(">              Status|NEW                         |RESOLVED", comment.text)
        self.assertIn("> --- Comment #2 from j.fikar@gmail.com ---", comment.text)
        self.assertTrue(comment.text.endswith("> You are watching the assignee of the bug."))
        self.assertEqual(
            event.summary_line(),
            "djwong@kernel.org commented on bug 217604 'Kernel metadata repair facility is not"
            " available, but kernel has XFS_ONLINE_REPAIR=y'",
        )

    def test_06_attachment_added(self) -> None:
        """An attachment notice at the top of comment #2 gives the attachment and an attachment event."""
        event = _parse_sample("06_attachment_added_to_existing_bug.eml")
        self.assertEqual(event.bug_id, 219111)
        self.assertEqual((event.product, event.component), ("Drivers", "USB"))
        self.assertEqual(event.event_type, "attachment")
        self.assertEqual(event.attachments, (Attachment(306640, "cat /sys/kernel/debug/usb/usbmon/1u"),))
        self.assertEqual(
            event.comments,
            (
                Comment(
                    2,
                    "com+bugzilla-kernel@c-henry.fr",
                    "result of `cat /sys/kernel/debug/usb/usbmon/1u` after device is plugged.",
                    "CH",
                ),
            ),
        )
        self.assertEqual(event.changes, ())
        self.assertEqual(
            event.summary_line(),
            "com+bugzilla-kernel@c-henry.fr added attachment 306640 to bug 219111"
            " 'Xone:23C mixer not recognized as a 2in/2out device'",
        )

    def test_08_wrapped_columns_rejoined(self) -> None:
        """Values wrapped at white space and split hard at 27 characters are re-joined exactly."""
        event = _parse_sample("08_multi_field_change_multipart_html_long_subject.eml")
        self.assertEqual(event.bug_id, 111694)
        self.assertEqual((event.product, event.component), ("DRI", "DRM/Intel"))
        self.assertEqual(event.event_type, "changed")
        self.assertEqual(
            event.changes,
            (
                Change("QA Contact", "", "intel-gfx-bugs@lists.freedesktop.org"),
                Change("i915 platform", "", "TGL, KBL, SKL, BDW, IVB, G45"),
                Change("Component", "DRM/other", "DRM/Intel"),
                Change("i915 features", "", "display/Other"),
                Change("Assignee", "dri-devel@lists.freedesktop.org", "intel-gfx-bugs@lists.freedesktop.org"),
                Change("CC", "", "intel-gfx-bugs@lists.freedesktop.org"),
            ),
        )
        self.assertEqual(
            event.summary,
            '[CI][DRMTIP] igt@kms_hdmi_inject@inject-audio - fail - Failed assertion: glob("/proc/asound/'
            'card*/" ELD_PREFIX "*", GLOB_NOSORT, NULL, &glob_buf) == 0, glob failed',
        )
        self.assertEqual(event.comments, ())
        self.assertEqual(event.who_name, "Lakshmi")

    def test_09_utf8_subject_base64_body_footer(self) -> None:
        """Two encoded words decode to one summary; the base64 body's list footer is not in the comment."""
        event = _parse_sample("09_cc_change_utf8_subject_base64_body.eml")
        self.assertEqual(event.bug_id, 212107)
        self.assertEqual(event.summary, "Temperature increase by 15°C on radeon gpu")
        self.assertEqual(event.changes, (Change("CC", "", "Dieter@nuetzel-hh.de"),))
        self.assertEqual(
            event.comments,
            (
                Comment(
                    2,
                    "Dieter@nuetzel-hh.de",
                    "It could be the ZeroCore thing, which has finally landed with 5.11.\n"
                    "Please verify, that your gfx fans stopped with 5.11 and running with all\n"
                    "kernels below 5.11.",
                    "Dieter Nützel",
                ),
            ),
        )
        self.assertEqual(event.who_name, "Dieter Nützel")
        self.assertEqual(event.event_type, "changed")

    def test_12_redhat_needinfo(self) -> None:
        """The Red Hat variant gives its extra headers, the wrapped needinfo flag and the UTF-8 comment."""
        event = _parse_sample("12_rhbz_changed_needinfo_RECONSTRUCTED.eml")
        self.assertEqual(event.bug_id, 2254321)
        self.assertEqual((event.product, event.component), ("Fedora", "python-requests"))
        self.assertEqual(event.classification, "Fedora")
        self.assertEqual(
            event.changes,
            (
                Change("Status", "NEW", "ASSIGNED"),
                Change("Flags", "", "needinfo?(packager.reporter@example.org)"),
            ),
        )
        comment = event.comment
        assert comment is not None
        self.assertEqual((comment.number, comment.author), (3, "jane.packager@example.com"))
        self.assertTrue(comment.text.endswith("Déjà vu from F38 :-)"))
        self.assertEqual(event.flags, ("needinfo?",))
        self.assertEqual(event.target_milestone, "---")
        self.assertEqual(event.headers["X-Bugzilla-Reporter"], "packager.reporter@example.org")
        self.assertEqual(event.headers["X-Bugzilla-Sub-Component"], "")
        self.assertEqual(event.headers["X-Bugzilla-Comment"], "public")
        self.assertEqual(event.changes[1].name, "flagtypes.name")

    def test_13_legacy_2x_parsed_as_new(self) -> None:
        """
        Decision: a Bugzilla 2.x mail is parsed as a new bug, its changer taken
        from the ReportedBy row and its "Additional Comments" marker read as a
        comment without a number.
        """
        event = _parse_sample("13_rhbz_2006_legacy_bugzilla2x_new_bug_EXCERPT.eml")
        self.assertEqual(event.bug_id, 201726)
        self.assertEqual((event.product, event.component), ("Fedora Core", "kernel"))
        self.assertEqual(event.event_type, "new")
        self.assertEqual(event.summary, "massive kernel spewage with DWARF2 unwinder errors")
        self.assertEqual(event.who, "netllama@gmail.com")
        self.assertEqual(event.status, "NEW")
        self.assertEqual(event.assignee, "kernel-maint@redhat.com")
        self.assertEqual(event.source, "https://bugzilla.redhat.com/bugzilla/")
        self.assertEqual(event.changed_fields, ())
        self.assertIn(Change("ReportedBy", "", "netllama@gmail.com"), event.changes)
        self.assertEqual([(c.number, c.author) for c in event.comments], [(0, "netllama@gmail.com"), (None, "netllama@gmail.com")])
        self.assertTrue(event.comments[0].text.startswith("Description of problem:"))
        self.assertTrue(event.comments[0].text.endswith("on an HP xw9300 workstation"))
        self.assertEqual(event.comments[1].text, "")
        self.assertEqual(event.attachments, (Attachment(133794, "dmesg which includes the copious backtraces"),))
        self.assertNotIn("Configure bugmail", event.comments[0].text + event.comments[1].text)

    def test_14_launchpad_rejected(self) -> None:
        """Launchpad bug mail is refused as not Bugzilla, naming Launchpad."""
        error = _error(_sample("14_not_bugzilla_launchpad_bug_mail.eml"))
        self.assertIsInstance(error, NotBugmail)
        self.assertEqual(error.code, "launchpad")
        self.assertIn("Launchpad", error.reason)
        self.assertIn("not Bugzilla", error.reason)

    def test_crlf_same_as_lf(self) -> None:
        """Every sample parses to the same event (or the same error) with CRLF line endings."""
        self.assertEqual(len(SAMPLES), 10)
        for name in SAMPLES:
            lf = _sample(name)
            crlf = lf.replace(b"\n", b"\r\n")
            self.assertNotEqual(lf, crlf)
            try:
                expected: BugEvent | tuple[type, str] = parse_bugmail(lf)
            except BugmailError as e:
                expected = (type(e), e.reason)
            try:
                got: BugEvent | tuple[type, str] = parse_bugmail(crlf)
            except BugmailError as e:
                got = (type(e), e.reason)
            self.assertEqual(got, expected, name)

    def test_to_json_is_plain_json(self) -> None:
        """Every parsed sample serialises to JSON and back to the same dict."""
        for name in SAMPLES:
            try:
                event = _parse_sample(name)
            except NotBugmail:
                continue
            body = event.to_json()
            self.assertEqual(json.loads(json.dumps(body, ensure_ascii=False)), body)
            self.assertEqual(body["bug_id"], event.bug_id)
            self.assertEqual(body["changes"], [c.to_json() for c in event.changes])
            self.assertEqual(body["comment"], event.comment.to_json() if event.comment else None)


class LayoutTests(SynchronousTestCase):
    """
    The fixed-width layout rules of the body.
    """

    def test_hard_split_and_soft_wrap(self) -> None:
        """A full 27-character piece without spaces joins without a space, any other piece with one."""
        body = (
            "Alice <alice@example.org> changed:\n\n" + TABLE_HEAD + "         Whiteboard|abcdefghijklmnopqrstuvwxyz0 |one two three four five six\n"
            "                   |123                         |seven\n"
        )
        event = parse_bugmail(_mail(body))
        self.assertEqual(
            event.changes, (Change("Whiteboard", "abcdefghijklmnopqrstuvwxyz0123", "one two three four five six seven"),)
        )

    def test_wrapped_attachment_label(self) -> None:
        """A label wrapped at 18 characters ("Attachment #310101 Flags") is one row, not two."""
        body = (
            "Alice <alice@example.org> changed:\n\n" + TABLE_HEAD + " Attachment #310101|                            |review?(bob@example.org),\n"
            "              Flags|                            |feedback?(carol@example.org\n"
            "                   |                            |)\n"
            "             Status|NEW                         |ASSIGNED\n"
        )
        event = parse_bugmail(_mail(body))
        self.assertEqual(
            event.changes,
            (
                Change("Attachment #310101 Flags", "", "review?(bob@example.org), feedback?(carol@example.org)"),
                Change("Status", "NEW", "ASSIGNED"),
            ),
        )
        self.assertEqual(event.changes[0].name, "flagtypes.name")

    def test_label_only_continuation(self) -> None:
        """A continuation line carrying only a label piece extends the label."""
        body = (
            "Alice <alice@example.org> changed:\n\n" + TABLE_HEAD + "  Attachment #12 is|0                           |1\n"
            "           obsolete|                            |\n"
        )
        event = parse_bugmail(_mail(body))
        self.assertEqual(event.changes, (Change("Attachment #12 is obsolete", "0", "1"),))
        self.assertEqual(event.changes[0].name, "attachments.isobsolete")

    def test_bar_inside_value(self) -> None:
        """A '|' inside a value does not move the columns: they are cut by offset."""
        body = "Alice <alice@example.org> changed:\n\n" + TABLE_HEAD + "            Summary|a|b                         |c|d\n"
        event = parse_bugmail(_mail(body))
        self.assertEqual(event.changes, (Change("Summary", "a|b", "c|d"),))

    def test_several_changers_and_comments(self) -> None:
        """Two change blocks and two comments in one mail are all kept, in order."""
        body = (
            "Alice <alice@example.org> changed:\n\n" + TABLE_HEAD + "             Status|NEW                         |ASSIGNED\n\n"
            "Bob (bob@example.org) changed:\n\n" + TABLE_HEAD + "           Priority|P3                          |P1\n\n"
            "--- Comment #7 from Alice <alice@example.org> ---\nTaking it.\n\n"
            "--- Comment #8 from Bob (bob@example.org) ---\nUrgent.\n"
        )
        event = parse_bugmail(_mail(body))
        self.assertEqual(event.changes, (Change("Status", "NEW", "ASSIGNED"), Change("Priority", "P3", "P1")))
        self.assertEqual(
            event.comments,
            (
                Comment(7, "alice@example.org", "Taking it.", "Alice"),
                Comment(8, "bob@example.org", "Urgent.", "Bob"),
            ),
        )
        self.assertEqual(event.comment, event.comments[0])
        self.assertEqual(event.who_name, "Alice")

    def test_table_after_comment_header_not_parsed(self) -> None:
        """A change table pasted into a comment is comment text, never changes."""
        pasted = TABLE_HEAD + "             Status|NEW                         |CLOSED\n"
        body = "--- Comment #2 from alice@example.org ---\nI saw this:\n" + pasted
        event = parse_bugmail(_mail(body))
        self.assertEqual(event.changes, ())
        self.assertEqual(event.event_type, "comment")
        comment = event.comment
        assert comment is not None
        self.assertIn("|NEW                         |CLOSED", comment.text)
        self.assertEqual((comment.author, comment.author_name), ("alice@example.org", None))

    def test_table_in_new_bug_description_not_parsed(self) -> None:
        """A change table inside a new bug's description stays in the description."""
        body = (
            "            Bug ID: 4242\n"
            "           Summary: Widget explodes\n"
            "          Reporter: alice@example.org\n\n"
            "Steps:\n" + TABLE_HEAD + "             Status|NEW                         |CLOSED\n"
        )
        event = parse_bugmail(_mail(body, bz_type="new"))
        self.assertEqual(
            event.changes,
            (
                Change("Bug ID", "", "4242"),
                Change("Summary", "", "Widget explodes"),
                Change("Reporter", "", "alice@example.org"),
            ),
        )
        comment = event.comment
        assert comment is not None
        self.assertEqual(comment.number, 0)
        self.assertIn("|NEW                         |CLOSED", comment.text)

    def test_new_bug_wrapped_value(self) -> None:
        """A new-bug table value wrapped onto continuation lines is re-joined."""
        body = (
            "            Bug ID: 4242\n"
            "                CC: aaaaaaaaaaaaaaaaaaaaaa@example.org, bbbbbbbbbbbbbb@example.org,\n"
            "                    cccc@example.org\n"
        )
        event = parse_bugmail(_mail(body, bz_type="new"))
        self.assertIn(
            Change("CC", "", "aaaaaaaaaaaaaaaaaaaaaa@example.org, bbbbbbbbbbbbbb@example.org, cccc@example.org"),
            event.changes,
        )
        self.assertIsNone(event.comment)

    def test_dep_changed(self) -> None:
        """A dependency mail names the blocker and its state change."""
        body = (
            "Bug 4242 depends on bug 1000, which changed state.\n\n"
            "Bug 1000 Summary: Sprocket missing\n"
            "https://bz.example.org/show_bug.cgi?id=1000\n\n"
            + TABLE_HEAD
            + "             Status|ASSIGNED                    |RESOLVED\n"
            "         Resolution|---                         |FIXED\n"
        )
        event = parse_bugmail(_mail(body, bz_type="dep_changed"))
        self.assertEqual(event.event_type, "dep_changed")
        self.assertEqual(event.blocker, Blocker(1000, "Sprocket missing"))
        self.assertEqual(event.changes, (Change("Status", "ASSIGNED", "RESOLVED"), Change("Resolution", "---", "FIXED")))
        self.assertEqual(
            event.summary_line(),
            "alice@example.org changed the state of bug 1000, which bug 4242 'Widget explodes' depends on",
        )

    def test_attachment_with_own_flag_rows(self) -> None:
        """Flag rows about the attachment the mail creates keep it an attachment event."""
        body = (
            "Alice <alice@example.org> changed:\n\n" + TABLE_HEAD + "    Attachment #777|                            |review?\n"
            "              Flags|                            |\n\n"
            "--- Comment #3 from Alice <alice@example.org> ---\n"
            "Created attachment 777\n"
            "  --> https://bz.example.org/attachment.cgi?id=777&action=edit\n"
            "Patch v1\n\n"
            "Please review.\n"
        )
        event = parse_bugmail(_mail(body))
        self.assertEqual(event.event_type, "attachment")
        self.assertEqual(event.changes, (Change("Attachment #777 Flags", "", "review?"),))
        self.assertEqual(event.attachments, (Attachment(777, "Patch v1"),))
        comment = event.comment
        assert comment is not None
        self.assertEqual(comment.text, "Please review.")

    def test_attachment_notice_needs_matching_link(self) -> None:
        """'Created attachment N' typed by a user without Bugzilla's link line is plain text."""
        body = "--- Comment #3 from alice@example.org ---\nCreated attachment 777\nno link here\n"
        event = parse_bugmail(_mail(body))
        self.assertEqual(event.attachments, ())
        self.assertEqual(event.event_type, "comment")
        comment = event.comment
        assert comment is not None
        self.assertTrue(comment.text.startswith("Created attachment 777"))

    def test_mozilla_layout(self) -> None:
        """
        bugzilla.mozilla.org's layout is read: the preamble above the link, the
        timestamped comment header, Changed-Field-Names, and a footer whose
        signature line lost its trailing space.
        """
        body = "--- Comment #12 from Byron Jones [:glob] <glob@example.org> 2012-02-06 22:10:22 PST ---\nLooks good.\n"
        footer = (
            "\n--\nConfigure bugmail: https://bz.example.org/userprefs.cgi?tab=email\n"
            "------- You are receiving this mail because: -------\nYou are watching the component for the bug.\n"
        )
        raw = _mail(
            body,
            who="glob@example.org",
            headers=(
                ("X-Bugzilla-Changed-Fields", "CC Flags Comment Created"),
                ("X-Bugzilla-Changed-Field-Names", "cc flagtypes.name comment"),
            ),
            footer=footer,
        ).replace(b"\n\nhttps://bz.example.org/show_bug", b"\n\nDo not reply to this email. You can add comments to this bug at\nhttps://bz.example.org/show_bug")
        self.assertIn(b"Do not reply", raw)
        event = parse_bugmail(raw)
        self.assertEqual(event.comments, (Comment(12, "glob@example.org", "Looks good.", "Byron Jones [:glob]"),))
        self.assertEqual(event.changed_fields, ("cc", "flagtypes.name", "comment"))

    def test_referenced_bugs_not_in_comment(self) -> None:
        """Bugzilla 5's 'Referenced Bugs:' list after the last comment is not comment text."""
        body = (
            "--- Comment #4 from alice@example.org ---\nSee bug 17.\n\n"
            "Referenced Bugs:\n\nhttps://bz.example.org/show_bug.cgi?id=17\n[Bug 17] Older widget bug\n"
        )
        comment = parse_bugmail(_mail(body)).comment
        assert comment is not None
        self.assertEqual(comment.text, "See bug 17.")

    def test_user_signature_in_comment_kept(self) -> None:
        """A '-- ' signature inside a comment does not end it; Bugzilla's footer does."""
        body = "--- Comment #4 from alice@example.org ---\nThanks\n-- \nAlice\n"
        comment = parse_bugmail(_mail(body)).comment
        assert comment is not None
        self.assertEqual(comment.text, "Thanks\n--\nAlice")

    def test_mailing_list_footer_without_bugzilla_footer(self) -> None:
        """Without Bugzilla's footer, a Mailman footer is still cut from the comment."""
        footer = "\n_______________________________________________\nfoo mailing list\nfoo@lists.example.org\n"
        comment = parse_bugmail(_mail("--- Comment #4 from alice@example.org ---\nHi.\n", footer=footer)).comment
        assert comment is not None
        self.assertEqual(comment.text, "Hi.")

    def test_quoted_printable_and_charset(self) -> None:
        """A quoted-printable ISO-8859-1 body is decoded before the layout is read."""
        raw = _mail("--- Comment #1 from alice@example.org ---\nCaf\xe9 =\nau lait\n").replace(
            b'charset="UTF-8"\nContent-Transfer-Encoding: 8bit', b"charset=iso-8859-1\nContent-Transfer-Encoding: quoted-printable"
        )
        raw = raw.replace("Caf\xe9".encode("utf-8"), b"Caf=E9").replace(b"id=4242", b"id=3D4242")
        comment = parse_bugmail(raw).comment
        assert comment is not None
        self.assertEqual(comment.text, "Café au lait")

    def test_unknown_charset_falls_back_to_utf8(self) -> None:
        """A charset that is not on the allow-list (here punycode) decodes as UTF-8."""
        raw = _mail("--- Comment #1 from alice@example.org ---\nna\xefve\n").replace(
            b'charset="UTF-8"', b"charset=punycode"
        )
        comment = parse_bugmail(raw).comment
        assert comment is not None
        self.assertEqual(comment.text, "na\xefve")


class HeaderTests(SynchronousTestCase):
    """
    Header decoding, validation and hygiene.
    """

    def test_list_prefixes_in_subject(self) -> None:
        """Mailing-list tags and reply prefixes before '[Bug N]' are skipped."""
        event = parse_bugmail(_mail(subject="[dri-devel] Re: [Bug 4242] [CI] Widget explodes"))
        self.assertEqual((event.bug_id, event.summary), (4242, "[CI] Widget explodes"))

    def test_new_prefix_kept_on_change_mail(self) -> None:
        """'New: ' is a prefix only on new-bug mail; on a change it belongs to the summary."""
        event = parse_bugmail(_mail(subject="[Bug 4242] New: kind of widget"))
        self.assertEqual(event.summary, "New: kind of widget")

    def test_issue_term(self) -> None:
        """Sites that renamed 'Bug' (terms.Bug) are understood."""
        self.assertEqual(parse_bugmail(_mail(subject="[Issue 4242] Widget explodes")).bug_id, 4242)

    def test_control_characters_removed(self) -> None:
        """Control, bidi-override and line-separator characters never reach header-derived values."""
        raw = _mail(
            summary="Wid\x1b[31mget\u202e explodes",
            headers=(("X-Bugzilla-Keywords", "crash,\x07 regression"), ("X-Bugzilla-Custom", "a\x00b\u2028c")),
        )
        event = parse_bugmail(raw)
        self.assertEqual(event.summary, "Wid[31mget explodes")
        self.assertEqual(event.keywords, ("crash", "regression"))
        self.assertEqual(event.headers["X-Bugzilla-Custom"], "ab c")

    def test_encoded_words_in_bugzilla_headers(self) -> None:
        """RFC 2047 words in X-Bugzilla-* headers are decoded; encoded control characters are removed."""
        raw = _mail(headers=(("X-Bugzilla-Classification", "=?UTF-8?Q?Caf=C3=A9=0A_Bar?="),))
        self.assertEqual(parse_bugmail(raw).classification, "Café  Bar")

    def test_bogus_charset_in_encoded_word(self) -> None:
        """An encoded word with an unknown charset is decoded as UTF-8, not refused."""
        event = parse_bugmail(_mail(subject="[Bug 4242] =?x-no-such?B?w7w=?= =?zlib?Q?ok?="))
        self.assertEqual(event.summary, "üok")

    def test_header_names_canonical(self) -> None:
        """X-Bugzilla-* header names are reported in their canonical spelling whatever their case."""
        raw = _mail().replace(b"X-Bugzilla-URL:", b"x-bugzilla-url:").replace(b"X-Bugzilla-Who:", b"X-BUGZILLA-WHO:")
        event = parse_bugmail(raw)
        self.assertEqual(event.headers["X-Bugzilla-URL"], "https://bz.example.org/")
        self.assertEqual(event.headers["X-Bugzilla-Who"], "alice@example.org")

    def test_mbox_from_line(self) -> None:
        """An mbox 'From ' separator line before the headers is skipped."""
        event = parse_bugmail(b"From bugzilla-daemon@example.org Tue Jan 23 14:05:09 2024\n" + _mail())
        self.assertEqual(event.bug_id, 4242)


class RejectionTests(SynchronousTestCase):
    """
    Mail that is refused, and why.
    """

    def test_hierarchy(self) -> None:
        """Both rejections are BugmailError, which is a FedhubError."""
        self.assertTrue(issubclass(NotBugmail, BugmailError))
        self.assertTrue(issubclass(MalformedBugmail, BugmailError))
        self.assertTrue(issubclass(BugmailError, FedhubError))
        error = MalformedBugmail("why", code="because")
        self.assertEqual((str(error), error.reason, error.code), ("why", "why", "because"))

    def test_plain_mail(self) -> None:
        """Mail without X-Bugzilla-* headers is not bugmail, whatever its subject says."""
        error = _error(b"From: a@example.org\nSubject: [Bug 1] hello\n\nhttps://x/show_bug.cgi?id=1\n")
        self.assertIsInstance(error, NotBugmail)
        self.assertEqual(error.code, "not_bugzilla")
        self.assertIn("no X-Bugzilla-* headers", error.reason)

    def test_empty_input(self) -> None:
        """Empty bytes are not bugmail."""
        self.assertIsInstance(_error(b""), NotBugmail)

    def test_other_bugzilla_mail_types(self) -> None:
        """Flag requests, whines and account mail are Bugzilla mail but not bug events."""
        for kind in ("request", "whine", "admin", "nag"):
            error = _error(_mail(bz_type=kind))
            self.assertIsInstance(error, NotBugmail)
            self.assertEqual(error.code, "not_bug_event")
            self.assertIn(repr(kind), error.reason)

    def test_subject_without_bug(self) -> None:
        """A Subject that does not name a bug is malformed."""
        error = _error(_mail(subject="hello"))
        self.assertIsInstance(error, MalformedBugmail)
        self.assertEqual(error.code, "bad_subject")

    def test_bug_id_mismatch(self) -> None:
        """Subject and link naming different bugs are refused."""
        error = _error(_mail(link="https://bz.example.org/show_bug.cgi?id=4243"))
        self.assertEqual(error.code, "bug_id_mismatch")
        error = _error(_mail(headers=(("X-Bugzilla-ID", "99"),)))
        self.assertEqual(error.code, "bug_id_mismatch")

    def test_bug_id_range(self) -> None:
        """Bug ids must be positive and fit Bugzilla's 32-bit column; non-ASCII digits are not digits."""
        for subject in ("[Bug 0] x", "[Bug 2147483648] x", "[Bug 99999999999999999999] x"):
            error = _error(_mail(subject=subject))
            self.assertIsInstance(error, MalformedBugmail)
            self.assertIn(error.code, ("bad_bug_id", "bad_subject"))
        error = _error(_mail(subject="[Bug \u0664\u0662] x"))
        self.assertEqual(error.code, "bad_subject")
        self.assertEqual(parse_bugmail(_mail(bug_id=2147483647)).bug_id, 2147483647)

    def test_no_link_line(self) -> None:
        """A text part without a show_bug.cgi link is refused."""
        error = _error(_mail(link="no link"))
        self.assertEqual(error.code, "no_bug_link")

    def test_missing_product(self) -> None:
        """Bugmail without product or component is malformed."""
        error = _error(_mail().replace(b"X-Bugzilla-Product: Gadgets\n", b""))
        self.assertEqual(error.code, "missing_headers")

    def test_bad_who(self) -> None:
        """An X-Bugzilla-Who that is not a login is refused."""
        error = _error(_mail(who="alice example.org"))
        self.assertEqual(error.code, "bad_who")

    def test_empty_who_taken_from_body(self) -> None:
        """An empty X-Bugzilla-Who falls back to the changer named in the body."""
        body = "Bob (bob@example.org) changed:\n\n" + TABLE_HEAD + "           Priority|P3                          |P1\n"
        event = parse_bugmail(_mail(body, who=""))
        self.assertEqual((event.who, event.who_name), ("bob@example.org", "Bob"))

    def test_no_who_anywhere(self) -> None:
        """Without X-Bugzilla-Who and without a changer in the body the mail is refused."""
        error = _error(_mail(who=None))
        self.assertEqual(error.code, "no_who")

    def test_conflicting_duplicate_headers(self) -> None:
        """The same X-Bugzilla-* header twice with different values is refused; identical repeats are fine."""
        error = _error(_mail(headers=(("X-Bugzilla-Product", "Other"),)))
        self.assertEqual(error.code, "conflicting_headers")
        self.assertEqual(parse_bugmail(_mail(headers=(("X-Bugzilla-Product", "Gadgets"),))).product, "Gadgets")

    def test_long_header(self) -> None:
        """An over-long X-Bugzilla-* header is refused."""
        error = _error(_mail(headers=(("X-Bugzilla-Keywords", "k" * 9000),)))
        self.assertEqual(error.code, "header_too_long")

    def test_too_many_bugzilla_headers(self) -> None:
        """More distinct X-Bugzilla-* headers than the limit are refused."""
        error = _error(_mail(headers=tuple((f"X-Bugzilla-X{i}", "v") for i in range(70))))
        self.assertEqual(error.code, "too_many_headers")

    def test_too_large(self) -> None:
        """Mail over the size limit is refused before it is parsed."""
        error = _error(_mail("x" * MAX_MAIL_BYTES))
        self.assertEqual(error.code, "too_large")

    def test_too_many_header_lines(self) -> None:
        """A header block with more lines than the limit is refused."""
        raw = _mail().replace(b"X-Bugzilla-Reason: None\n", b"X-Bugzilla-Reason: None\n" + b" x\n" * MAX_HEADER_LINES)
        self.assertEqual(_error(raw).code, "too_many_header_lines")

    def test_encrypted(self) -> None:
        """bugzilla.mozilla.org's encrypted secure-bug mail is refused with its own reason."""
        error = _error(_mail(headers=(("X-Bugzilla-Encrypt", "1"),)))
        self.assertEqual(error.code, "encrypted")

    def test_unexpected_failure_contained(self) -> None:
        """A failure inside the parser surfaces as MalformedBugmail('internal_error'), chaining the cause."""

        def broken(raw: bytes) -> BugEvent:
            raise RecursionError("deep")

        self.patch(parser, "_parse", broken)
        error = _error(_mail())
        self.assertIsInstance(error, MalformedBugmail)
        self.assertEqual(error.code, "internal_error")
        self.assertIn("RecursionError", error.reason)
        self.assertIsInstance(error.__cause__, RecursionError)

    def test_type_error(self) -> None:
        """Passing text instead of bytes is a programming error, not a mail error."""
        self.assertRaises(TypeError, parse_bugmail, "From: x\n\n")


def _multipart(inner: bytes, boundary: str, ctype: str = "multipart/mixed") -> bytes:
    return (
        f'Content-Type: {ctype}; boundary="{boundary}"\n\n--{boundary}\n'.encode()
        + inner
        + f"\n--{boundary}--\n".encode()
    )


class MimeTests(SynchronousTestCase):
    """
    The MIME walk and its limits.
    """

    def _headers_and_text(self) -> tuple[bytes, bytes]:
        raw = _mail("--- Comment #1 from alice@example.org ---\nHi.\n")
        head, _, text = raw.partition(b"\n\n")
        head = b"\n".join(
            line for line in head.split(b"\n") if not line.startswith((b"Content-Type", b"Content-Transfer"))
        )
        return head, text

    def test_text_part_preferred_over_html(self) -> None:
        """In multipart/alternative the text/plain part is read, whatever the order."""
        head, text = self._headers_and_text()
        html = b"Content-Type: text/html\n\n<p>https://bz.example.org/show_bug.cgi?id=4242</p>"
        plain = b"Content-Type: text/plain; charset=utf-8\n\n" + text
        for first, second in ((html, plain), (plain, html)):
            body = b"--b\n" + first + b"\n--b\n" + second + b"\n--b--\n"
            raw = head + b'\nContent-Type: multipart/alternative; boundary="b"\n\n' + body
            comment = parse_bugmail(raw).comment
            assert comment is not None
            self.assertEqual(comment.text, "Hi.")

    def test_missing_close_delimiter(self) -> None:
        """A multipart body cut before its close delimiter still yields its last part."""
        head, text = self._headers_and_text()
        raw = head + b"\nContent-Type: multipart/mixed; boundary=zz\n\npreamble\n--zz\nContent-Type: text/plain\n\n" + text
        self.assertEqual(parse_bugmail(raw).bug_id, 4242)

    def test_html_only(self) -> None:
        """Bugmail with only an HTML part is refused with its own reason."""
        head, _ = self._headers_and_text()
        raw = head + b"\nContent-Type: text/html\n\n<html>https://bz.example.org/show_bug.cgi?id=4242</html>\n"
        self.assertEqual(_error(raw).code, "no_text_part")

    def test_depth_limit(self) -> None:
        """MIME nesting beyond the limit is refused; nesting within it is followed."""
        head, text = self._headers_and_text()
        leaf = b"Content-Type: text/plain\n\n" + text
        for depth, ok in ((MAX_MIME_DEPTH, True), (MAX_MIME_DEPTH + 1, False)):
            entity = leaf
            for level in range(depth):
                entity = _multipart(entity, f"level{level}")
            raw = head + b"\n" + entity
            if ok:
                self.assertEqual(parse_bugmail(raw).bug_id, 4242)
            else:
                self.assertEqual(_error(raw).code, "mime_too_deep")

    def test_part_limit(self) -> None:
        """More MIME parts than the limit are refused."""
        head, text = self._headers_and_text()
        parts = b"".join(b"--b\nContent-Type: text/plain\n\nfiller\n" for _ in range(MAX_MIME_PARTS + 1))
        raw = head + b"\nContent-Type: multipart/mixed; boundary=b\n\n" + parts + b"--b--\n"
        self.assertEqual(_error(raw).code, "too_many_parts")

    def test_multipart_without_boundary(self) -> None:
        """A multipart entity without a boundary parameter is refused."""
        head, text = self._headers_and_text()
        raw = head + b"\nContent-Type: multipart/mixed\n\n" + text
        self.assertEqual(_error(raw).code, "bad_mime")

    def test_parameter_limit(self) -> None:
        """A Content-Type with more parameters than the limit is refused; at the limit it is read."""
        head, text = self._headers_and_text()
        for count, ok in ((MAX_CONTENT_TYPE_PARAMS - 1, True), (MAX_CONTENT_TYPE_PARAMS + 1, False)):
            params = "".join(f"; p{i}=v" for i in range(count))
            raw = head + f"\nContent-Type: text/plain; charset=utf-8{params}\n\n".encode() + text
            if ok:
                self.assertEqual(parse_bugmail(raw).bug_id, 4242)
            else:
                self.assertEqual(_error(raw).code, "too_many_parameters")

    def test_quoted_boundary_with_escapes(self) -> None:
        """A quoted boundary with a backslash escape and a ';' is unquoted as RFC 2045 says."""
        head, text = self._headers_and_text()
        raw = (
            head
            + b'\nContent-Type: multipart/mixed; boundary="a\\"b;c" ; x=y\n\n--a"b;c\nContent-Type: text/plain\n\n'
            + text
            + b'\n--a"b;c--\n'
        )
        self.assertEqual(parse_bugmail(raw).bug_id, 4242)

    def test_base64_with_junk(self) -> None:
        """Base64 bodies with stray characters and missing padding still decode."""
        import base64

        head, text = self._headers_and_text()
        encoded = base64.b64encode(text).rstrip(b"=")
        noisy = b"\n".join(encoded[i : i + 60] + b"!" for i in range(0, len(encoded), 60))
        raw = head + b"\nContent-Type: text/plain\nContent-Transfer-Encoding: base64\n\n" + noisy + b"\n"
        comment = parse_bugmail(raw).comment
        assert comment is not None
        self.assertEqual(comment.text, "Hi.")


def _outcome_of(function: Any, *args: Any) -> Any:
    """
    What C{function} returns, or the class and code of the L{BugmailError}
    it raises.
    """
    try:
        return function(*args)
    except BugmailError as e:
        return (type(e), e.code)


def _headers_one_by_one(fields: list[tuple[str, bytes]]) -> dict[str, str]:
    """
    The X-Bugzilla-* headers collected field by field, each value decoded on
    its own: what L{parser._bugzilla_headers} must give.
    """
    found: dict[str, str] = {}
    for lower, raw in fields:
        if not lower.startswith("x-bugzilla-"):
            continue
        name = parser._canonical_name(lower)
        if name is None:
            continue
        value = parser._header_text(raw, name)
        if name in found:
            if found[name] != value:
                raise MalformedBugmail(f"conflicting {name} headers", code="conflicting_headers")
            continue
        if len(found) >= parser.MAX_BUGZILLA_HEADERS:
            raise MalformedBugmail("too many", code="too_many_headers")
        found[name] = value
    return found


_NAMES = st.sampled_from(
    [b"X-Bugzilla-Product", b"x-bugzilla-who", b"X-Bugzilla-Flags", b"X-Bugzilla-New-Thing", b"Subject",
     b"To", b"X-Bugzilla-", b"X-Bugzilla-Bad_Name", b"x" * 128, b"y" * 129, b"Bad Name", b"", b"N\xc3\xa9"]
)
_VALUES = st.lists(
    st.sampled_from([b"", b" ", b"\t", b"value", b"a b", b"=?utf-8?q?caf=C3=A9?=", b"caf\xc3\xa9", b"\xff",
                     b"\x01", b"\x7f", b":", b"x" * 300]),
    max_size=4,
).map(b"".join)
_LINES = st.one_of(
    st.tuples(_NAMES, st.sampled_from([b":", b": ", b":\t ", b" :"]), _VALUES).map(b"".join),
    st.tuples(st.sampled_from([b" ", b"\t", b"  "]), _VALUES).map(b"".join),
    _VALUES,
)


class HeaderFastPathTests(SynchronousTestCase):
    """
    The header block read with a pattern, and X-Bugzilla-* values decoded
    all at once, give what reading line by line and value by value gives.
    """

    @settings(max_examples=500, deadline=None)
    @given(st.lists(_LINES, max_size=12), st.booleans(), st.sampled_from([b"", b"From x\n"]))
    def test_block_same_as_line_by_line(self, lines: list[bytes], ended: bool, prefix: bytes) -> None:
        """Fields, folds, lines that end the block, odd names and values: same fields, same body offset."""
        data = prefix + b"\n".join(lines) + (b"\n\nbody\n" if ended else b"")
        start = len(prefix)
        self.assertEqual(
            _outcome_of(parser._parse_header_block, data, start),
            _outcome_of(parser._parse_header_block_by_line, data, start),
        )

    def test_block_limits(self) -> None:
        """Blocks at and just past the line and byte limits are read or refused alike."""
        for count in (MAX_HEADER_LINES - 2, MAX_HEADER_LINES - 1, MAX_HEADER_LINES):
            data = b"X-A: b\n" * count + b"\nbody"
            self.assertEqual(
                _outcome_of(parser._parse_header_block, data, 0),
                _outcome_of(parser._parse_header_block_by_line, data, 0),
            )
        line = b"X-A: " + b"v" * 1000 + b"\n"
        whole = parser.MAX_HEADER_BLOCK_BYTES // len(line)
        for extra in (-2, -1, 0, 1, 2):
            data = line * whole + b"X-B: " + b"w" * (parser.MAX_HEADER_BLOCK_BYTES % len(line) + extra - 6)
            data += b"\n\nbody"
            self.assertEqual(
                _outcome_of(parser._parse_header_block, data, 0),
                _outcome_of(parser._parse_header_block_by_line, data, 0),
            )

    def test_block_hostile_white_space(self) -> None:
        """Many fields with long white space and a line that ends the block read in linear time."""
        data = (b"X-A:" + b" \t" * 40 + b"v" + b" " * 40 + b"\n" + b" \t" * 40 + b"\n") * 900
        data += b"not a field\n\nbody"
        began = time.process_time()
        fields, offset = parser._parse_header_block(data, 0)
        self.assertLess(time.process_time() - began, 2.0)
        self.assertEqual((fields, offset), parser._parse_header_block_by_line(data, 0))
        self.assertEqual(len(fields), 900)

    @settings(max_examples=500, deadline=None)
    @given(st.lists(st.tuples(_NAMES, _VALUES), max_size=10))
    def test_bugzilla_headers_same_as_one_by_one(self, pairs: list[tuple[bytes, bytes]]) -> None:
        """Values decoded together or one by one, conflicts and errors included, come out the same."""
        fields = [(name.decode("latin-1").lower(), value) for name, value in pairs]
        self.assertEqual(
            _outcome_of(parser._bugzilla_headers, fields), _outcome_of(_headers_one_by_one, fields)
        )

    def test_bugzilla_headers_long(self) -> None:
        """A value past the length limit is refused as before, whether or not another conflicts first."""
        for fields in (
            [("x-bugzilla-who", b"a" * 9000)],
            [("x-bugzilla-who", b"a"), ("x-bugzilla-who", b"b"), ("x-bugzilla-url", b"u" * 9000)],
            [("x-bugzilla-url", b"u" * 5000), ("x-bugzilla-who", b"w" * 5000)],
        ):
            self.assertEqual(
                _outcome_of(parser._bugzilla_headers, fields), _outcome_of(_headers_one_by_one, fields)
            )

    def test_space_is_isspace(self) -> None:
        """The white-space search finds exactly the characters str.isspace() accepts."""
        space = parser._SPACE
        differ = [
            hex(code) for code in range(sys.maxunicode + 1)
            if (space(chr(code)) is not None) != chr(code).isspace()
        ]
        self.assertEqual(differ, [])
