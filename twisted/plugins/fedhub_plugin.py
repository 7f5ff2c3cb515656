"""
The C{twistd fedhub} command.

Kept to one lazy L{ServiceMaker}: listing twistd's commands imports nothing
of fedhub beyond this file.
"""

from twisted.application.service import ServiceMaker

fedhub = ServiceMaker(
    "fedhub",
    "fedhub.tap",
    "Run the fedhub message bus hub (producers, consumers, broker connections).",
    "fedhub",
)
