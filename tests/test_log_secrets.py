"""
The whole-run log watch of C{tests/conftest.py} catches what it must.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tests.conftest import SECRET_PATTERNS


class PatternTests(SynchronousTestCase):
    """
    The patterns the log watch looks for.
    """

    def leaks(self, text: str) -> bool:
        return any(p.search(text) for p in SECRET_PATTERNS)

    def test_key_material(self) -> None:
        """PEM private keys of any kind are caught."""
        self.assertTrue(self.leaks("-----BEGIN PRIVATE KEY-----\nMIIE"))
        self.assertTrue(self.leaks("-----BEGIN RSA PRIVATE KEY-----"))
        self.assertFalse(self.leaks("-----BEGIN CERTIFICATE-----"))

    def test_passwords_in_urls(self) -> None:
        """A URL with a password is caught; the masked form fedhub logs is not."""
        self.assertTrue(self.leaks("connecting to amqp://guest:guest@127.0.0.1:5672/%2F"))
        self.assertTrue(self.leaks("amqps://hub:s3cret@broker/%2Finfra"))
        self.assertFalse(self.leaks("connecting to amqp://guest:***@127.0.0.1:5672/%2F"))
        self.assertFalse(self.leaks("amqp://127.0.0.1:5672/%2F and user@example.org"))
