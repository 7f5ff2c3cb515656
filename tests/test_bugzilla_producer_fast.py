"""
The short cuts of L{fedhub.producers.bugzilla.producer} give what the long
ways give: the message id of a fingerprint.
"""

from __future__ import annotations

import uuid

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from fedhub.producers.bugzilla.producer import _ID_NAMESPACE, message_id_for


class MessageIdTests(SynchronousTestCase):
    """
    L{message_id_for}.
    """

    @settings(max_examples=500, deadline=None)
    @given(st.text(max_size=80) | st.binary(min_size=32, max_size=32).map(bytes.hex))
    def test_same_as_uuid5(self, fingerprint: str) -> None:
        """The id is the text of uuid.uuid5 in the ids' namespace, for any fingerprint."""
        self.assertEqual(message_id_for(fingerprint), str(uuid.uuid5(_ID_NAMESPACE, fingerprint)))

    def test_a_uuid5(self) -> None:
        """The id parses as a version 5 UUID of the RFC 4122 variant, and is its own text."""
        text = message_id_for("ab" * 32)
        parsed = uuid.UUID(text)
        self.assertEqual((parsed.version, parsed.variant, str(parsed)), (5, uuid.RFC_4122, text))
