"""
Tests for the text predicates of L{fedhub.text}.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from fedhub.text import ascii_digits, escape_control, is_ip_address


class PredicateTests(SynchronousTestCase):
    """
    L{ascii_digits} and L{is_ip_address}.
    """

    def test_ascii_digits(self) -> None:
        """Only ASCII digits make a number: not '²' or another script's digits, which isdigit accepts."""
        self.assertTrue(ascii_digits("0123456789"))
        for text in ("", "12a", "-1", " 1", "\u00b2", "\u0662", "1\u0663"):
            self.assertFalse(ascii_digits(text), repr(text))
        self.assertTrue("\u00b2".isdigit())

    def test_is_ip_address(self) -> None:
        """IPv4 and IPv6 addresses are addresses; names and bracketed forms are not."""
        for text in ("127.0.0.1", "::1", "2001:db8::1"):
            self.assertTrue(is_ip_address(text), text)
        for text in ("localhost", "broker.example", "[::1]", "", "1.2.3"):
            self.assertFalse(is_ip_address(text), text)

    def test_escape_control_cut(self) -> None:
        """A long text is cut to the limit with an ellipsis, escapes counted."""
        self.assertEqual(escape_control("a\nb" * 10, 5), "a\\nb…")
        self.assertEqual(escape_control("abc", 3), "abc")
