"""
The durable outbox: where every producer hands its messages over.

An L{Outbox} writes each message to an on-disk L{Store} (SQLite, WAL,
C{synchronous=FULL}, group commit on one dedicated thread) before the
hand-over counts as done, then publishes through the domain's bus with a
bounded window of unconfirmed messages, deleting each only after the broker's
confirm.  Returned and refused messages wait in the store's failed area for
an operator.  See C{docs/outbox.md}.
"""

from fedhub.outbox.outbox import CONFIRMED, OBSERVED_EVENTS, Observer, Outbox, OutboxStats
from fedhub.outbox.store import (
    FAILURE_KINDS,
    NACKED,
    REJECTED,
    RETURNED,
    UNREADABLE,
    CommitResult,
    Executor,
    FailedPage,
    FailedRecord,
    Failure,
    Store,
    StoredRow,
    StoreError,
    Summary,
    SynchronousExecutor,
    ThreadExecutor,
)

__all__ = [
    "CONFIRMED",
    "FAILURE_KINDS",
    "NACKED",
    "OBSERVED_EVENTS",
    "REJECTED",
    "RETURNED",
    "UNREADABLE",
    "CommitResult",
    "Executor",
    "FailedPage",
    "FailedRecord",
    "Failure",
    "Observer",
    "Outbox",
    "OutboxStats",
    "Store",
    "StoreError",
    "StoredRow",
    "Summary",
    "SynchronousExecutor",
    "ThreadExecutor",
]
