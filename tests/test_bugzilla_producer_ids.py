"""
Message ids of bugmail stay what they were: the fingerprint of an event, the
id derived from it and the body bytes of its message are pinned for the
sample mails, so copies of one event handed over before and after a change
of the parser or the producer are still recognized as one (the seen-set of
C{fedhub inject-mail} and consumers de-duplicating by id rely on it).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from fedhub.producers.bugzilla.parser import parse_bugmail
from fedhub.producers.bugzilla.producer import build_message, event_fingerprint

DATA = Path(__file__).parent / "data" / "bugzilla"

#: Sample mail, fingerprint, message id, SHA-256 of the message's body bytes.
PINNED = (
    ("01_new_bug_textplain_attachment.eml", "ed529c30f1aea17d5853cb6db2edfeac6a355b5040f3e6a5cffa38f6bcf7dac3", "6d343a6d-1ad1-5cc2-a557-16712ec189fd", "046394ebc146ce061c0f314ad607aa475b9dc6f3051f5521024da66d8ee46d90"),
    ("02_new_bug_multipart_html.eml", "d3e5890f9936d40ced74830b481a21875584c1d841afe62e58d6f95d94df7f8d", "baefbcd3-7693-5925-9815-47d660abd0a4", "9f99751410ccf43e96b3b25873e56f998ea6326bd8dcd28f1e1c8db30ba86a2c"),
    ("04_changed_status_resolution_with_comment.eml", "b6106a06a0f1abaaae8db0c5ba98d9a2759bcb40daf385d5103e48c3117da8ec", "683ff193-5860-541e-b0cc-d9d7a0a6da88", "4f1ea880d8d7c6364a4ef6a6fbdf14b840f736f0fb2baaae660be39a802a3d0f"),
    ("05_comment_only_quoting_old_bugmail.eml", "b2ec53e640f67a9b0de1e34dc7bc155facc30387966a6af6f5fafb7d69e3a01f", "b2773cb2-14a8-5367-ba7e-352e6b09f6df", "f4e4ba5ace50d8b2ba84a7958980ff7033451f2f7fa2c6e67470b907c22dd96b"),
    ("06_attachment_added_to_existing_bug.eml", "62a7ea1ad093a457c87564062bfec42d72ca0019036368fd026a8250030a73be", "2b8be7f7-e290-565d-8211-ed8da53b4f01", "41cbbe04aa7015abb72486e8106d714a0415c7d813e76bbfa498398525f63f2a"),
    ("08_multi_field_change_multipart_html_long_subject.eml", "4562561c2d6d12c8b1587d42340ab02f8ffa7e3f6cfc0b5d0e3235f768f6865c", "8c2487b1-3e95-546d-a866-10274a616dd0", "01973f856c68493c720a4745e5381fd1d1b9882174891ed888931ad2a6332c92"),
    ("09_cc_change_utf8_subject_base64_body.eml", "a08efaabc2d32a537af549c1f3e4f375b8720bf21c41df20bd759761da630949", "034c73d5-dddd-5e59-a226-45439b3ff5b2", "8f81858a8a25d6d9d3aca6bf45428272028d45c1fc011a8530761d5c521d98c4"),
    ("12_rhbz_changed_needinfo_RECONSTRUCTED.eml", "cf8b158aaa17120ec51453a55aa62af65da80628058c269a829022eec381db96", "b35e322e-407c-534b-911b-b04af6fcc55d", "1a702730f45a159f84c11b63fe0b930818830f0f348b0610d56f2f4d373b57af"),
    ("13_rhbz_2006_legacy_bugzilla2x_new_bug_EXCERPT.eml", "21a97a01442e6dcd1107ad9f4fbd3c3e5013c0765cfe93ca8ac1693a863688c0", "e95f4b47-ee11-557e-a4f9-361397ef0744", "80eb7a39dcd7df073d9414bbb4fbfa653e1cd288daaa56fc867abd7c428c738b"),
)


class PinnedIdTests(SynchronousTestCase):
    """
    L{event_fingerprint}, L{build_message} ids and bodies of the sample mails.
    """

    def test_pinned(self) -> None:
        """Every sample mail gives the fingerprint, id and body bytes it always gave."""
        for name, fingerprint, message_id, body_sha in PINNED:
            event = parse_bugmail((DATA / name).read_bytes())
            message = build_message(event, lambda suffix: "org.example." + suffix)
            self.assertEqual(
                (event_fingerprint(event), message.id, hashlib.sha256(message.body_bytes).hexdigest()),
                (fingerprint, message_id, body_sha),
                name,
            )
