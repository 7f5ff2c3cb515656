"""
Tests for the text predicates of L{fedhub.text}.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from fedhub.message import Message
from fedhub.text import ascii_digits, escape_control, is_ip_address, summarize


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


class _CountingList(list):  # type: ignore[type-arg]
    """
    A list that counts the items taken from it.
    """

    taken = 0

    def __iter__(self):  # type: ignore[no-untyped-def]
        for item in list.__iter__(self):
            _CountingList.taken += 1
            yield item


class SummarizeTests(SynchronousTestCase):
    """
    L{summarize}.
    """

    def test_same_as_the_whole_body_cut(self) -> None:
        """
        Without a summary, the body as compact JSON with sorted keys, cut to
        the limit and escaped, exactly as encoding the whole body and then
        cutting it would give.
        """
        import json

        bodies = [
            {},
            {"b": 1, "a": "x"},
            {"text": "é\n" * 200, "n": [1, 2, {"z": None, "y": True}]},
            {"k": "a" * 159},
            {"k": "a" * 160},
            {"nested": [[["deep"] * 50] * 5]},
        ]
        for body in bodies:
            whole = json.dumps(body, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
            for limit in (1, 10, 160, 1000):
                self.assertEqual(
                    summarize(Message.create("a.b", body), limit),
                    escape_control(whole, limit),
                    (body, limit),
                )

    def test_large_body_encoded_in_part(self) -> None:
        """A large body is encoded only as far as the summary shows."""
        body = {"items": _CountingList(range(100_000))}
        message = Message.create("a.b", {})
        object.__setattr__(message, "body", body)
        _CountingList.taken = 0
        summary = summarize(message, 160)
        self.assertTrue(summary.startswith('{"items":[0,1,2,'))
        self.assertTrue(summary.endswith("…"))
        self.assertEqual(len(summary), 160)
        self.assertLess(_CountingList.taken, 100)

    def test_summary_header_or_field_first(self) -> None:
        """The producer's summary header wins over a summary field, which wins over the body."""
        message = Message.create("a.b", {"summary": "from the body", "x": 1})
        self.assertEqual(summarize(message), "from the body")
        message = Message.create("a.b", {"summary": "from the body"},
                                 headers={"fedhub_summary": "from the header"})
        self.assertEqual(summarize(message), "from the header")
