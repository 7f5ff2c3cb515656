"""
Edge cases of L{fedhub.producers.bugzilla.parser} where a wrong reading would
raise nothing: change tables laid out the way Bugzilla's C{format_columns}
lays them out (the expected tables were produced with Perl's Text::Wrap and
Bugzilla's C{multiline_sprintf}), and mails whose parts look like structure.
"""

# twisted.trial's assertion methods carry no annotations.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from fedhub.producers.bugzilla.parser import Change, parse_bugmail

from tests.test_bugmail_parser import TABLE_HEAD, _mail

CHANGED = "Alice <alice@example.org> changed:\n\n"


class WrappedLabelTests(SynchronousTestCase):
    """
    A custom field's label longer than its column wraps together with its
    values, and is still one change.
    """

    def test_wrapped_label_with_hard_split_value(self) -> None:
        """A wrapped label whose value is split hard on the same lines is one row, not a bogus 'Version' change."""
        body = CHANGED + TABLE_HEAD + (
            "    Target Upstream|                            |python-requests-2.31.0-1.fc\n"
            "            Version|                            |40\n"
            "             Status|NEW                         |ASSIGNED\n"
        )
        fields = (("X-Bugzilla-Changed-Fields", "cf_target_upstream_version bug_status"),)
        event = parse_bugmail(_mail(body, headers=fields))
        self.assertEqual(
            event.changes,
            (
                Change("Target Upstream Version", "", "python-requests-2.31.0-1.fc40"),
                Change("Status", "NEW", "ASSIGNED"),
            ),
        )

    def test_wrapped_label_with_hard_split_removed_value(self) -> None:
        """A wrapped label is one row when its removed value is split hard and its added value wraps at white space."""
        body = CHANGED + TABLE_HEAD + (
            "    Internal Target|python-requests-2.31.0-1.fc |hello world 1.0\n"
            "            Release|40 NEW                      |xxxxxxxxxxxxxxxxxxxxxxxxxxx\n"
            "                   |                            |xxx foo-1.2.3-4.fc40\n"
        )
        event = parse_bugmail(_mail(body))
        self.assertEqual(
            event.changes,
            (
                Change(
                    "Internal Target Release",
                    "python-requests-2.31.0-1.fc40 NEW",
                    "hello world 1.0 xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx foo-1.2.3-4.fc40",
                ),
            ),
        )

    def test_custom_row_after_custom_row_with_long_word(self) -> None:
        """A custom field's row whose first word does not fit after the value above still starts a new change."""
        body = CHANGED + TABLE_HEAD + (
            "     0 000 00000000|0000000000000000000         |\n"
            "      i915 platform|00000000                    |\n"
        )
        event = parse_bugmail(_mail(body))
        self.assertEqual(
            event.changes,
            (Change("0 000 00000000", "0000000000000000000", ""), Change("i915 platform", "00000000", "")),
        )

    def test_stock_row_after_full_width_value_stays_a_row(self) -> None:
        """A stock field's row after a value exactly as wide as its column starts a new change when that field changed."""
        table = CHANGED + TABLE_HEAD + (
            "       00000 000000|                            |000000000000000000000000000\n"
            "             Status|                            |0\n"
        )
        expected = (Change("00000 000000", "", "000000000000000000000000000"), Change("Status", "", "0"))
        self.assertEqual(parse_bugmail(_mail(table)).changes, expected)
        listed = (("X-Bugzilla-Changed-Fields", "cf_zero bug_status"),)
        self.assertEqual(parse_bugmail(_mail(table, headers=listed)).changes, expected)

    def test_short_row_after_custom_label_stays_a_row(self) -> None:
        """A row whose values could not continue the previous line's values starts a new change."""
        body = CHANGED + TABLE_HEAD + (
            "    Target Upstream|1.0                         |2.0\n"
            "            Version|1.1                         |1.2\n"
        )
        event = parse_bugmail(_mail(body))
        self.assertEqual(
            event.changes, (Change("Target Upstream", "1.0", "2.0"), Change("Version", "1.1", "1.2"))
        )

    def test_stock_label_then_row(self) -> None:
        """A complete stock label followed by a row whose values could continue it still starts a new change."""
        body = CHANGED + TABLE_HEAD + (
            "         Depends on|                            |123456, 234567, 345678,\n"
            "            Version|                            |456789\n"
        )
        event = parse_bugmail(_mail(body))
        self.assertEqual(
            event.changes,
            (Change("Depends on", "", "123456, 234567, 345678,"), Change("Version", "", "456789")),
        )

    def test_stock_row_after_custom_label_stays_a_row(self) -> None:
        """A stock field's row whose long first word does not fit after the previous value still starts a new change."""
        body = CHANGED + TABLE_HEAD + (
            "   Fixed In Version|                            |foo-1.2.3-4.fc40\n"
            "                 CC|                            |bob@example.org\n"
            "  Attachment #12 is|0                           |1\n"
            "           obsolete|                            |\n"
        )
        event = parse_bugmail(_mail(body))
        self.assertEqual(
            event.changes,
            (
                Change("Fixed In Version", "", "foo-1.2.3-4.fc40"),
                Change("CC", "", "bob@example.org"),
                Change("Attachment #12 is obsolete", "0", "1"),
            ),
        )


class PastedBugmailTests(SynchronousTestCase):
    """
    Old bugmail pasted into a comment without quote marks stays comment text.
    """

    def test_pasted_comment_header_stays_in_comment(self) -> None:
        """An older comment's header pasted into a comment is text, not a second comment."""
        pasted = (
            "-----Original Message-----\n"
            "From: bugzilla-daemon@example.org\n"
            "Subject: [Bug 4242] Widget explodes\n\n"
            "https://bz.example.org/show_bug.cgi?id=4242\n\n"
            + CHANGED + TABLE_HEAD
            + "             Status|NEW                         |RESOLVED\n\n"
            "--- Comment #2 from Alice <alice@example.org> ---\n"
            "Fixed upstream."
        )
        body = "--- Comment #3 from Bob <bob@example.org> ---\nThanks, see below.\n\n" + pasted + "\n"
        event = parse_bugmail(_mail(body, who="bob@example.org"))
        self.assertEqual(event.changes, ())
        self.assertEqual(event.event_type, "comment")
        self.assertEqual(
            [(c.number, c.author) for c in event.comments], [(3, "bob@example.org")]
        )
        comment = event.comment
        assert comment is not None
        self.assertEqual(comment.text, "Thanks, see below.\n\n" + pasted)

    def test_later_comments_still_split(self) -> None:
        """Comments with rising numbers are still separate comments."""
        body = (
            "--- Comment #3 from Bob <bob@example.org> ---\nOne.\n\n"
            "--- Comment #4 from Bob <bob@example.org> ---\nTwo.\n"
        )
        event = parse_bugmail(_mail(body, who="bob@example.org"))
        self.assertEqual([(c.number, c.text) for c in event.comments], [(3, "One."), (4, "Two.")])
